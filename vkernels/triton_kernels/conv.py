"""Fused conv2d + bias + residual + activation as Triton implicit GEMMs: forward, input and weight
gradients, and the launchers of every conv kernel (depthwise convs go to depthwise_conv's direct kernels).

A convolution is a GEMM whose operands are gathered on the fly, with no im2col buffer:
- forward: out[pixel, cout] = sum over (tap, cin) of input[pixel moved by tap, cin] * weight[cout, cin, tap],
  then bias, residual and the activation in the epilogue (conv_common), so the pre-activation
  reaches memory only when the backward needs it (see conv_common);
- input gradient: the same kernel run transposed: grad_input[pixel, cin] = sum over (tap, cout) of
  grad_pre[pixel moved back by tap, cout] * weight[cout, cin, tap];
- weight gradient: grad_weight[cout, (tap, cin)] = sum over output pixels of grad_pre * moved input,
  which also yields grad_bias and the materialised grad_pre from the same grad_out tiles.
grad_pre, the gradient w.r.t. the pre-activation, is grad_out through the activation's derivative,
applied as grad_out is loaded. The fused max-pool runs the forward GEMM once per pool tap and keeps a
running maximum.

The kernels read and write activations channels_last (NHWC) and weights OHWI, as the CUDA backend
does; NCHW tensors are copied once on the way in and results once on the way out. In NHWC every
channel block is one vectorised, coalesced access. In NCHW a [pixels, channels] tile has no contiguity
Triton can prove: the loads and stores went element by element at stride H*W (a sector per element),
and the row bookkeeping of the store layout (64 rows per thread) spilled up to 2.9 KB/thread on sm_90.
The kernels still take every tensor's strides: grad_weight and bias keep theirs.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from vkernels.shapes import is_channels_last, memory_format, window_index_dtype
from vkernels.triton_kernels.autotuning import INTERPRETED, autotune
from vkernels.triton_kernels.conv_common import (
    ACTIVATION_CODES,
    NONE,
    RELU,
    conv_epilogue,
    load_grad,
    output_pixels,
    split_blocks,
)
from vkernels.triton_kernels.depthwise_conv import (
    depthwise_conv2d_kernel,
    depthwise_conv2d_weight_grad_kernel,
    depthwise_tile,
)

# Channels per group from which K is walked tap by tap (every block of channels a contiguous load);
# below it K runs over (tap, channel) pairs so that e.g. the RGB stem does not pad 3 channels to a block.
_TAP_MAJOR_CHANNELS = 16


def _autotune_configs(blocks: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) rows; the interpreter gets one
    small config, so CPU runs never benchmark."""
    if INTERPRETED:
        blocks = [(16, 16, 16, 4, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in blocks
    ]


# Shared memory the pipelined operand tiles may take: sm_90 gives a block 227 KiB, and the epilogue's
# layout conversions need up to ~36 KiB more (fp32 weight-grad 64x128x128 at 3 stages overflowed).
_OPERAND_SHARED_BYTES = 160 * 1024


def _fit_shared_memory(stage_elements):
    """A prune giving configs whose stages of stage_elements(blocks) operand elements of the input
    dtype exceed _OPERAND_SHARED_BYTES fewer stages: 4-byte inputs take twice the room of 16-bit ones."""
    def prune(configs, args):
        element = args.get("src_ptr", args.get("input_ptr")).dtype.itemsize
        fitted = {}
        for config in configs:
            stage_bytes = stage_elements(config.kwargs) * element
            stages = max(1, min(config.num_stages, _OPERAND_SHARED_BYTES // stage_bytes))
            fitted.setdefault((tuple(config.kwargs.items()), config.num_warps, stages),
                              triton.Config(config.kwargs, num_warps=config.num_warps, num_stages=stages))
        return list(fitted.values())
    return prune


# Operand elements of one pipeline stage. Implicit GEMM: [BLOCK_M x BLOCK_K] @ [BLOCK_K x BLOCK_N];
# weight gradient: [BLOCK_N couts x BLOCK_M pixels] @ [BLOCK_M pixels x BLOCK_K columns].
_FIT_GEMM_STAGES = _fit_shared_memory(lambda b: b["BLOCK_K"] * (b["BLOCK_M"] + b["BLOCK_N"]))
_FIT_WEIGHT_GRAD_STAGES = _fit_shared_memory(lambda b: b["BLOCK_M"] * (b["BLOCK_N"] + b["BLOCK_K"]))


_CONV_BLOCKS = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3),
]
# The fused max-pool also holds the running maximum and its position beside the accumulator: 8 warps
# per tile keep that in registers (the GEMM's 128x128 and 4-warp 128x64 tiles spilled 0.3-1.9 KB/thread).
_POOLED_BLOCKS = [
    (128, 64, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 64, 8, 3), (64, 64, 64, 8, 3), (64, 64, 64, 4, 3),
]
# BLOCK_M is the reduction (pixel) step; the tile is BLOCK_N couts x BLOCK_K (tap, cin) columns.
_WEIGHT_GRAD_BLOCKS = [(64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (32, 64, 64, 4, 4)]


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program pid, walking GROUP_M row tiles down each column of tiles so that
    consecutive programs share weight tiles and input rows in L2."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _phase_taps(phase, pad, dilation, stride, KSIZE: tl.constexpr):
    """First tap and number of taps along one axis that connect input positions congruent to `phase`
    (mod stride) to output positions: tap k does iff phase + pad - k*dilation is a multiple of stride.
    The launcher passes the spacing of those taps, stride / gcd(stride, dilation)."""
    first = KSIZE
    count = 0
    for j in tl.static_range(KSIZE):
        k = KSIZE - 1 - j  # descending, so that the last hit written is the first tap
        hit = (phase + pad - k * dilation) % stride == 0
        first = tl.where(hit, k, first)
        count += hit.to(tl.int32)
    return first, count


@triton.jit
def _tap_shift(k, phase, pad, dilation, stride, TRANSPOSED: tl.constexpr):
    """Source coordinate minus the destination's scaled coordinate for tap k (scalar or vector).
    Forward: in = out*stride + k*dilation - pad. Transposed, for an input position phase + i*stride:
    out = i + (phase + pad - k*dilation) / stride, an exact division for the phase's taps."""
    if TRANSPOSED:
        return (phase + pad - k * dilation) // stride
    else:
        return k * dilation - pad


@triton.jit
def _offsets(n, c, h, w, s_n, s_c, s_h, s_w):
    """Element offsets of tensor[n, c, h, w] for broadcastable index blocks; the pixel part first, so
    that it stays a column vector when only c varies along a block's columns."""
    return (n * s_n + h * s_h + w * s_w) + c * s_c


@triton.jit
def _implicit_gemm_tile(
    src_ptr, src_sn, src_sc, src_sh, src_sw, saved_ptr,
    w_base, w_sk, w_sn, w_sh, w_sw,
    n, base_h, base_w, m_ok, offs_n, n_ok, group, SRC_H, SRC_W, K_CH,
    phase_h, phase_w, first_h, first_w, count_h, count_w,
    SH, SW, PH, PW, DH, DW, TAP_STEP_H, TAP_STEP_W, negative_slope,
    KH: tl.constexpr, KW: tl.constexpr,
    TRANSPOSED: tl.constexpr, POINTWISE: tl.constexpr, TAP_MAJOR: tl.constexpr,
    GRAD_ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The fp32 [BLOCK_M pixels, BLOCK_N n-channels] accumulator of the implicit GEMM: destination pixel
    m reads source rows base_h[m] + tap shift (and columns alike); rows with m_ok False read zeros.
    With GRAD_ACTIVATION the source is grad_out, taken through the activation's derivative of the
    saved tensor (addressed like the source) as it is loaded."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if POINTWISE:
        num_steps = tl.cdiv(K_CH, BLOCK_K)
    elif TAP_MAJOR:
        c_blocks = tl.cdiv(K_CH, BLOCK_K)
        num_steps = count_h * count_w * c_blocks
    else:
        k_total = count_h * count_w * K_CH
        num_steps = tl.cdiv(k_total, BLOCK_K)
    # one flat loop over K (not taps x channel blocks) so that the pipeliner overlaps every step
    for step in range(num_steps):
        if POINTWISE:
            # 1x1, stride 1, no padding: a plain GEMM, row addresses loop-invariant, no bounds checks
            c = step * BLOCK_K + offs_k
            k_ok = c < K_CH
            w_tap = 0
            valid = m_ok[:, None] & k_ok[None, :]
            src_h = base_h[:, None]
            src_w = base_w[:, None]
        else:
            if TAP_MAJOR:
                # K ordered (kh, kw, channel block): the tap is a scalar, bounds a column vector
                tap = step // c_blocks
                c = (step % c_blocks) * BLOCK_K + offs_k
                k_ok = c < K_CH
                kh = first_h + (tap // count_w) * TAP_STEP_H
                kw = first_w + (tap % count_w) * TAP_STEP_W
                shift_h = _tap_shift(kh, phase_h, PH, DH, SH, TRANSPOSED)
                shift_w = _tap_shift(kw, phase_w, PW, DW, SW, TRANSPOSED)
                w_tap = kh * w_sh + kw * w_sw
            else:
                # K ordered (tap, channel) element by element: taps vary along the block's columns
                k = step * BLOCK_K + offs_k
                k_ok = k < k_total
                tap = k // K_CH
                c = k % K_CH
                kh = first_h + (tap // count_w) * TAP_STEP_H
                kw = first_w + (tap % count_w) * TAP_STEP_W
                shift_h = _tap_shift(kh, phase_h, PH, DH, SH, TRANSPOSED)[None, :]
                shift_w = _tap_shift(kw, phase_w, PW, DW, SW, TRANSPOSED)[None, :]
                w_tap = (kh * w_sh + kw * w_sw)[:, None]
            src_h = base_h[:, None] + shift_h
            src_w = base_w[:, None] + shift_w
            valid = (m_ok[:, None] & k_ok[None, :]
                     & (src_h >= 0) & (src_h < SRC_H) & (src_w >= 0) & (src_w < SRC_W))
        a = load_grad(src_ptr, saved_ptr,
                      _offsets(n[:, None], (group * K_CH + c)[None, :], src_h, src_w, src_sn, src_sc, src_sh, src_sw),
                      valid, GRAD_ACTIVATION, negative_slope)
        b = tl.load(w_base + c[:, None] * w_sk + w_tap + offs_n[None, :] * w_sn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@autotune(
    _autotune_configs(_CONV_BLOCKS),
    key=["BATCH", "SRC_H", "SRC_W", "DST_H", "DST_W", "K_CH", "N_CH", "SH", "SW", "DH", "DW", "KH", "KW",
         "TRANSPOSED", "GRAD_ACTIVATION"],
    sizes=("BATCH", "SRC_H", "SRC_W", "DST_H", "DST_W", "K_CH", "N_CH"),
    prune=_FIT_GEMM_STAGES,
)
@triton.jit
def _conv2d_implicit_gemm_kernel(
    src_ptr, weight_ptr, dst_ptr, bias_ptr, residual_ptr, pre_ptr, saved_ptr,
    BATCH, SRC_H, SRC_W, DST_H, DST_W, K_CH, N_CH,
    src_sn, src_sc, src_sh, src_sw,
    w_sk, w_sn, w_sh, w_sw, w_group_stride,
    dst_sn, dst_sc, dst_sh, dst_sw,
    SH, SW, PH, PW, DH, DW, TAP_STEP_H, TAP_STEP_W, negative_slope,
    KH: tl.constexpr, KW: tl.constexpr,
    TRANSPOSED: tl.constexpr, POINTWISE: tl.constexpr, TAP_MAJOR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr,
    GRAD_ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dst[pixel, n-channel] = sum over (tap, k-channel) of src[pixel moved by tap, k-channel] * weight.

    Forward: src = input, dst = out = act(acc + bias + residual) (and pre = acc + bias + residual with
    STORE_PRE; residual and pre are addressed like dst), k-channels = cin of the group, n-channels =
    cout of the group.
    TRANSPOSED (input gradient): src = grad_out (through GRAD_ACTIVATION's derivative of the saved
    tensor, addressed like src) or grad_pre, dst = grad_input, k = cout, n = cin; destination pixels
    are split by phase (position mod stride, grid axis 2), so that every pixel of a program meets the
    same taps and no MMA is spent on taps that fall between output pixels.
    Grid: (pixel tiles x n-channel tiles, groups, phases).
    """
    group = tl.program_id(1)
    if TRANSPOSED:
        phase_h = tl.program_id(2) // SW
        phase_w = tl.program_id(2) % SW
        dst_step_h = SH
        dst_step_w = SW
        src_step_h = 1
        src_step_w = 1
        first_h, count_h = _phase_taps(phase_h, PH, DH, SH, KH)
        first_w, count_w = _phase_taps(phase_w, PW, DW, SW, KW)
    else:
        phase_h = 0
        phase_w = 0
        dst_step_h = 1
        dst_step_w = 1
        src_step_h = SH
        src_step_w = SW
        first_h = 0
        first_w = 0
        count_h = KH
        count_w = KW

    rows = tl.cdiv(DST_H - phase_h, dst_step_h)
    cols = tl.cdiv(DST_W - phase_w, dst_step_w)
    m_total = BATCH * rows * cols
    num_pid_m = tl.cdiv(BATCH * tl.cdiv(DST_H, dst_step_h) * tl.cdiv(DST_W, dst_step_w), BLOCK_M)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(N_CH, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= m_total:  # the grid is sized for phase 0, the largest
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m_total
    n = (offs_m // (rows * cols)).to(tl.int64)
    i_h = (offs_m % (rows * cols)) // cols
    i_w = offs_m % cols
    base_h = i_h * src_step_h
    base_w = i_w * src_step_w
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_CH
    w_base = weight_ptr + group * w_group_stride
    acc = _implicit_gemm_tile(
        src_ptr, src_sn, src_sc, src_sh, src_sw, saved_ptr,
        w_base, w_sk, w_sn, w_sh, w_sw,
        n, base_h, base_w, m_ok, offs_n, n_ok, group, SRC_H, SRC_W, K_CH,
        phase_h, phase_w, first_h, first_w, count_h, count_w,
        SH, SW, PH, PW, DH, DW, TAP_STEP_H, TAP_STEP_W, negative_slope,
        KH, KW, TRANSPOSED, POINTWISE, TAP_MAJOR, GRAD_ACTIVATION, INPUT_PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )

    dst_h = phase_h + i_h * dst_step_h
    dst_w = phase_w + i_w * dst_step_w
    channel = group * N_CH + offs_n
    out_ok = m_ok[:, None] & n_ok[None, :]
    out_offsets = _offsets(n[:, None], channel[None, :], dst_h[:, None], dst_w[:, None], dst_sn, dst_sc, dst_sh, dst_sw)
    acc = conv_epilogue(acc, bias_ptr, channel, n_ok, residual_ptr, pre_ptr, out_offsets, out_ok, negative_slope,
                        HAS_BIAS, HAS_RESIDUAL, STORE_PRE, ACTIVATION)
    tl.store(dst_ptr + out_offsets, acc.to(dst_ptr.dtype.element_ty), mask=out_ok)


@autotune(
    _autotune_configs(_POOLED_BLOCKS),
    key=["BATCH", "H", "W", "CONV_H", "CONV_W", "POOL_H", "POOL_W", "K_CH", "N_CH", "SH", "SW", "DH", "DW",
         "KH", "KW", "PKH", "PKW", "PSH", "PSW", "DEPTHWISE"],
    sizes=("BATCH", "H", "W", "CONV_H", "CONV_W", "POOL_H", "POOL_W", "K_CH", "N_CH"),
    prune=_FIT_GEMM_STAGES,
)
@triton.jit
def _conv2d_relu_maxpool2d_kernel(
    input_ptr, weight_ptr, out_ptr, argmax_ptr, bias_ptr,
    BATCH, H, W, CONV_H, CONV_W, POOL_H, POOL_W, K_CH, N_CH,
    x_sn, x_sc, x_sh, x_sw,
    w_sk, w_sn, w_sh, w_sw, w_group_stride,
    out_sn, out_sc, out_sh, out_sw,
    am_sn, am_sc, am_sh, am_sw,
    SH, SW, PH, PW, DH, DW, PSH, PSW, PPH, PPW,
    KH: tl.constexpr, KW: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr,
    DEPTHWISE: tl.constexpr, POINTWISE: tl.constexpr, TAP_MAJOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[pooled pixel, cout] = max over the pool window of relu(conv2d(input, weight) + bias), and
    argmax = the window position (row * PKW + col) of that maximum; the activation is never written.

    Each pool tap runs the forward implicit GEMM for the conv pixels under that tap (pool windows
    overlap, so a 3x3/2 pool recomputes some conv pixels: compute traded for the activation's
    round trip through memory). Taps outside the conv output are -inf padding and skipped, ties keep
    the first maximum and NaN wins, as in torch's max-pool. Grid: (pixel tiles x cout tiles, groups).
    """
    group = tl.program_id(1)
    m_total = BATCH * POOL_H * POOL_W
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(m_total, BLOCK_M), tl.cdiv(N_CH, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m_total
    n = (offs_m // (POOL_H * POOL_W)).to(tl.int64)
    pool_h = (offs_m % (POOL_H * POOL_W)) // POOL_W
    pool_w = offs_m % POOL_W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_CH
    channel = group * N_CH + offs_n
    w_base = weight_ptr + group * w_group_stride

    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    best_position = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for position in range(PKH * PKW):
        conv_h = pool_h * PSH - PPH + position // PKW
        conv_w = pool_w * PSW - PPW + position % PKW
        tap_ok = m_ok & (conv_h >= 0) & (conv_h < CONV_H) & (conv_w >= 0) & (conv_w < CONV_W)
        if DEPTHWISE:  # one group of all channels (the launcher's grid), each channel its own weights
            acc = depthwise_tile(input_ptr, x_sn, x_sc, x_sh, x_sw, input_ptr, w_base, w_sn, w_sh, w_sw,
                                 n, conv_h, conv_w, tap_ok, channel, n_ok, H, W, SH, SW, PH, PW, DH, DW, 0.0,
                                 KH, KW, False, NONE, BLOCK_M, BLOCK_N)
        else:
            acc = _implicit_gemm_tile(
                input_ptr, x_sn, x_sc, x_sh, x_sw, input_ptr,
                w_base, w_sk, w_sn, w_sh, w_sw,
                n, conv_h * SH, conv_w * SW, tap_ok, offs_n, n_ok, group, H, W, K_CH,
                0, 0, 0, 0, KH, KW,
                SH, SW, PH, PW, DH, DW, 1, 1, 0.0,
                KH, KW, False, POINTWISE, TAP_MAJOR, NONE, INPUT_PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K,
            )
        acc = conv_epilogue(acc, bias_ptr, channel, n_ok, bias_ptr, bias_ptr, 0, tap_ok[:, None] & n_ok[None, :],
                            0.0, HAS_BIAS, False, False, RELU)
        # compare what the unfused ops would: the activation rounded to the output dtype
        value = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        take = tap_ok[:, None] & ((value > best) | (value != value))
        best_position = tl.where(take, position, best_position)
        best = tl.where(take, value, best)

    out_ok = m_ok[:, None] & n_ok[None, :]
    pixel = n * out_sn + pool_h * out_sh + pool_w * out_sw
    tl.store(out_ptr + (pixel[:, None] + channel[None, :] * out_sc), best.to(out_ptr.dtype.element_ty), mask=out_ok)
    am_pixel = n * am_sn + pool_h * am_sh + pool_w * am_sw
    tl.store(argmax_ptr + (am_pixel[:, None] + channel[None, :] * am_sc),
             best_position.to(argmax_ptr.dtype.element_ty), mask=out_ok)


@autotune(
    _autotune_configs(_WEIGHT_GRAD_BLOCKS),
    key=["BATCH", "H", "W", "OH", "OW", "CIN_G", "COUT_G", "SH", "SW", "DH", "DW", "KH", "KW", "COMPUTE_WEIGHT"],
    sizes=("BATCH", "H", "W", "OH", "OW", "CIN_G", "COUT_G"),
    prune=_FIT_WEIGHT_GRAD_STAGES,
)
@triton.jit
def _conv2d_weight_grad_kernel(
    input_ptr, grad_ptr, saved_ptr, grad_weight_ptr, grad_bias_ptr, grad_pre_ptr,
    BATCH, H, W, OH, OW, CIN_G, COUT_G,
    x_sn, x_sc, x_sh, x_sw,
    g_sn, g_sc, g_sh, g_sw,
    gw_split, gw_s0, gw_s1, gw_s2, gw_s3, gb_split,
    SH, SW, PH, PW, DH, DW, negative_slope,
    KH: tl.constexpr, KW: tl.constexpr, GRAD_ACTIVATION: tl.constexpr,
    TAP_MAJOR: tl.constexpr, COMPUTE_WEIGHT: tl.constexpr, COMPUTE_BIAS: tl.constexpr,
    WRITE_GRAD_PRE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight[cout, cin, kh, kw] = sum over output pixels of grad_pre[pixel, cout] * input[pixel moved
    by (kh, kw), cin]: a GEMM [couts x pixels] @ [pixels x (tap, cin)] reducing over N*OH*OW, where
    grad_pre is grad_out through GRAD_ACTIVATION's derivative of the saved tensor (grad_out, saved and
    grad_pre are addressed alike).

    Grid: (cout tiles x column tiles, groups, splits). Split s sums a fixed contiguous range of pixel
    blocks into its own partial slice (no atomics); the launcher adds the slices in a fixed order.
    grad_bias and grad_pre (for the residual and the input gradient) come from the grad_out tiles
    loaded for the GEMM: every program sums its tile (branch-free; cheap next to the MMA) but only
    column tile 0 stores the sums and grad_pre, so each element is written exactly once and no extra
    pass reads grad_out.
    """
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_n = tl.program_id(0) % num_pid_n  # cout tiles fastest: neighbours share the input columns in L2
    pid_k = tl.program_id(0) // num_pid_n
    group = tl.program_id(1)
    split = tl.program_id(2)
    cout = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cout_ok = cout < COUT_G
    channel = group * COUT_G + cout
    m_total = BATCH * OH * OW
    first_block, last_block = split_blocks(split, tl.num_programs(2), m_total, BLOCK_M)

    offs_k = tl.arange(0, BLOCK_K)
    if TAP_MAJOR:
        c_blocks = tl.cdiv(CIN_G, BLOCK_K)
        tap = pid_k // c_blocks
        c = (pid_k % c_blocks) * BLOCK_K + offs_k
        k_ok = c < CIN_G
        kh = tap // KW
        kw = tap % KW
        shift_h = kh * DH - PH
        shift_w = kw * DW - PW
    else:
        k = pid_k * BLOCK_K + offs_k
        k_ok = k < KH * KW * CIN_G
        tap = k // CIN_G
        c = k % CIN_G
        kh = tap // KW
        kw = tap % KW
        shift_h = (kh * DH - PH)[None, :]
        shift_w = (kw * DW - PW)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for block in range(first_block, last_block):
        m_ok, n, oh, ow = output_pixels(block, m_total, OH, OW, BLOCK_M)
        g_ok = cout_ok[:, None] & m_ok[None, :]
        g_offsets = _offsets(n[None, :], channel[:, None], oh[None, :], ow[None, :], g_sn, g_sc, g_sh, g_sw)
        g = load_grad(grad_ptr, saved_ptr, g_offsets, g_ok, GRAD_ACTIVATION, negative_slope)
        if WRITE_GRAD_PRE:
            tl.store(grad_pre_ptr + g_offsets, g, mask=g_ok & (pid_k == 0))
        if COMPUTE_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=1)
        if COMPUTE_WEIGHT:
            ih = (oh * SH)[:, None] + shift_h
            iw = (ow * SW)[:, None] + shift_w
            x_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x = tl.load(input_ptr + _offsets(n[:, None], (group * CIN_G + c)[None, :], ih, iw, x_sn, x_sc, x_sh, x_sw),
                        mask=x_ok, other=0.0)
            acc = tl.dot(g, x, acc, input_precision=INPUT_PRECISION)

    if COMPUTE_WEIGHT:
        tl.store(grad_weight_ptr + split * gw_split + channel[:, None] * gw_s0 + (c * gw_s1 + kh * gw_s2 + kw * gw_s3)[None, :],
                 acc.to(grad_weight_ptr.dtype.element_ty), mask=cout_ok[:, None] & k_ok[None, :])
    if COMPUTE_BIAS:
        tl.store(grad_bias_ptr + split * gb_split + channel, bias_acc.to(grad_bias_ptr.dtype.element_ty),
                 mask=cout_ok & (pid_k == 0))


def _cudnn_conv_uses_tf32() -> bool:
    # torch >= 2.9 keeps a per-op setting (parents' settings propagate into it); reading the legacy
    # allow_tf32 raises once legacy and new settings disagree
    conv_settings = getattr(torch.backends.cudnn, "conv", None)
    if conv_settings is None:
        return torch.backends.cudnn.allow_tf32
    return conv_settings.fp32_precision == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 tensor cores exactly when torch's cuDNN convolutions do."""
    if dtype == torch.float32 and not INTERPRETED and _cudnn_conv_uses_tf32():
        return "tf32"
    return "ieee"


def _check_operands(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    assert dtype in (torch.float16, torch.bfloat16, torch.float32), (
        f"conv2d Triton kernels take float16, bfloat16 or float32, not {dtype}; route float64 to torch"
    )
    assert all(t.dtype == dtype for t in tensors), "conv2d: all tensors must share one dtype"
    assert all(t.dim() == 4 for t in tensors), "conv2d Triton kernels take 4-D tensors"


def _is_depthwise(weight: torch.Tensor, groups: int) -> bool:
    """One input and one output channel per group: no channel reduction, a per-channel stencil that
    the direct depthwise kernels compute."""
    return weight.shape[1] == 1 and weight.shape[0] == groups


def _is_pointwise(weight: torch.Tensor, groups: int, stride, padding) -> bool:
    """1x1, stride 1, no padding: the forward is a plain GEMM over pixels."""
    return (not _is_depthwise(weight, groups) and tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0))


def _forward_gemm_channels(weight: torch.Tensor, groups: int):
    """(k_channels, n_channels, weight stride along k, weight stride along n, grid groups) of the
    fused max-pool's forward; depthwise runs every channel in one group of the grid."""
    cout, cin_per_group = weight.shape[:2]
    if _is_depthwise(weight, groups):
        return cin_per_group, cout, weight.stride(1), weight.stride(0), 1
    return cin_per_group, cout // groups, weight.stride(1), weight.stride(0), groups


def _nhwc(tensor: torch.Tensor) -> torch.Tensor:
    """An operand in the layout the kernels read (see the module docstring); no copy when it is
    channels_last already."""
    return tensor.contiguous(memory_format=torch.channels_last)


def _empty_nhwc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def _in_format(result: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A kernel's NHWC result in the memory format the op returns: one copy when that is NCHW (a copy
    even where size-1 dims make the two formats coincide, so the strides are exactly contiguous ones,
    as the fake implementation gives)."""
    if channels_last:
        return result
    return torch.empty(result.shape, dtype=result.dtype, device=result.device).copy_(result)


def _launch_conv(src, weight, dst, stride, padding, dilation, groups, transposed, *, bias=None, residual=None,
                 pre=None, activation="none", saved=None, grad_activation="none", negative_slope=0.0):
    """dst = the forward conv of src with its epilogue (bias, residual, activation, pre stored), or
    with ``transposed`` the input gradient of grad_pre (src, taken through grad_activation's derivative
    of ``saved`` as it loads); depthwise convs run the direct kernels, the others the implicit GEMM.
    Every tensor NHWC-dense (made by _nhwc or _empty_nhwc): the kernels address residual and pre
    with dst's offsets, saved with src's."""
    batch = dst.shape[0]
    cout, cin_per_group = weight.shape[:2]
    kh, kw = weight.shape[2:]
    w_s0, w_s1, w_s2, w_s3 = weight.stride()
    # an operand not given gets a placeholder pointer that its constexpr switch never touches
    epilogue_args = (dst if bias is None else bias, dst if residual is None else residual, dst if pre is None else pre,
                     src if saved is None else saved)
    epilogue_flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, STORE_PRE=pre is not None,
                          ACTIVATION=ACTIVATION_CODES[activation], GRAD_ACTIVATION=ACTIVATION_CODES[grad_activation])
    if _is_depthwise(weight, groups):
        m_total = batch * dst.shape[2] * dst.shape[3]

        def depthwise_grid(meta):
            return (triton.cdiv(m_total, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_C"]))

        depthwise_conv2d_kernel[depthwise_grid](
            src, weight, dst, *epilogue_args,
            batch, src.shape[2], src.shape[3], dst.shape[2], dst.shape[3], cout,
            *src.stride(), w_s0, w_s2, w_s3, *dst.stride(),
            *stride, *padding, *dilation, negative_slope,
            KH=kh, KW=kw, TRANSPOSED=transposed, **epilogue_flags,
        )
        return
    if transposed:
        k_channels, n_channels, w_sk, w_sn = cout // groups, cin_per_group, w_s0, w_s1
        dst_step = stride
        # taps reaching one stride phase are spaced stride / gcd(stride, dilation) apart
        tap_step = tuple(s // math.gcd(s, d) for s, d in zip(stride, dilation))
        phases = stride[0] * stride[1]
    else:
        k_channels, n_channels, w_sk, w_sn = cin_per_group, cout // groups, w_s1, w_s0
        dst_step, tap_step, phases = (1, 1), (1, 1), 1
    m_max = batch * triton.cdiv(dst.shape[2], dst_step[0]) * triton.cdiv(dst.shape[3], dst_step[1])

    def grid(meta):
        return (triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(n_channels, meta["BLOCK_N"]), groups, phases)

    _conv2d_implicit_gemm_kernel[grid](
        src, weight, dst, *epilogue_args,
        batch, src.shape[2], src.shape[3], dst.shape[2], dst.shape[3], k_channels, n_channels,
        *src.stride(),
        w_sk, w_sn, w_s2, w_s3, (cout // groups) * w_s0,
        *dst.stride(),
        *stride, *padding, *dilation, *tap_step, negative_slope,
        KH=kh, KW=kw, TRANSPOSED=transposed, POINTWISE=_is_pointwise(weight, groups, stride, padding),
        TAP_MAJOR=k_channels % _TAP_MAJOR_CHANNELS == 0, INPUT_PRECISION=_dot_precision(src.dtype), GROUP_M=8,
        **epilogue_flags,
    )


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _weight_grad_splits(pixels: int, tiles: int, device: torch.device) -> int:
    """How many slices the pixel reduction is cut into: enough programs to fill the GPU twice over,
    each slice long enough that writing its partial tile is cheap next to its reduction."""
    if device.type == "cuda":
        target, min_pixels = 2 * _multiprocessor_count(device.index or 0), 2048
    else:  # the interpreter: a few slices, so that the split path is exercised on small tests
        target, min_pixels = 6, 16
    return max(1, min(triton.cdiv(target, tiles), pixels // min_pixels))


def _launch_weight_grad(grad_out, saved, input, weight, grad_weight, grad_bias, grad_pre,
                        stride, padding, dilation, groups, activation, negative_slope):
    """grad_weight and grad_bias (each None when not needed) of grad_pre = grad_out through the
    activation's derivative of ``saved``, and grad_pre itself when a tensor is given for it. grad_out,
    saved and grad_pre are NHWC-dense tensors of one shape: the kernels address them alike."""
    batch, _, out_h, out_w = grad_out.shape
    cout, cin_per_group, kh, kw = weight.shape
    depthwise = _is_depthwise(weight, groups)
    tap_major = cin_per_group % _TAP_MAJOR_CHANNELS == 0
    compute_weight = grad_weight is not None

    def column_tiles(block_k):
        if not compute_weight:
            return 1
        if tap_major:
            return kh * kw * triton.cdiv(cin_per_group, block_k)
        return triton.cdiv(kh * kw * cin_per_group, block_k)

    nominal_block = 16 if INTERPRETED else 64
    if depthwise:
        tiles = triton.cdiv(cout, nominal_block)
    else:
        tiles = triton.cdiv(cout // groups, nominal_block) * column_tiles(nominal_block) * groups
    splits = _weight_grad_splits(batch * out_h * out_w, tiles, grad_out.device)

    # one split writes straight into the gradients; more write float32 partials summed below
    weight_target, bias_target = grad_weight, grad_bias
    weight_strides = (0, *grad_weight.stride()) if compute_weight else (0,) * 5
    if splits > 1 and compute_weight:
        weight_target = torch.empty((splits, *weight.shape), dtype=torch.float32, device=weight.device)
        weight_strides = weight_target.stride()
    if splits > 1 and grad_bias is not None:
        bias_target = torch.empty((splits, cout), dtype=torch.float32, device=weight.device)

    tensors = (input, grad_out, grad_out if saved is None else saved,
               grad_out if weight_target is None else weight_target,
               grad_out if bias_target is None else bias_target,
               grad_out if grad_pre is None else grad_pre)
    flags = dict(KH=kh, KW=kw, GRAD_ACTIVATION=ACTIVATION_CODES[activation], COMPUTE_WEIGHT=compute_weight,
                 COMPUTE_BIAS=grad_bias is not None, WRITE_GRAD_PRE=grad_pre is not None)
    bias_split = cout if splits > 1 else 0
    if depthwise:
        split_stride, w_sc, _, w_sh, w_sw = weight_strides

        def depthwise_grid(meta):
            return (triton.cdiv(cout, meta["BLOCK_C"]), splits)

        depthwise_conv2d_weight_grad_kernel[depthwise_grid](
            *tensors, batch, input.shape[2], input.shape[3], out_h, out_w, cout,
            *input.stride(), *grad_out.stride(),
            split_stride, w_sc, w_sh, w_sw, bias_split,
            *stride, *padding, *dilation, negative_slope,
            TAPS=triton.next_power_of_2(kh * kw), **flags,
        )
    else:
        def grid(meta):
            return (triton.cdiv(cout // groups, meta["BLOCK_N"]) * column_tiles(meta["BLOCK_K"]), groups, splits)

        _conv2d_weight_grad_kernel[grid](
            *tensors, batch, input.shape[2], input.shape[3], out_h, out_w, cin_per_group, cout // groups,
            *input.stride(), *grad_out.stride(),
            *weight_strides, bias_split,
            *stride, *padding, *dilation, negative_slope,
            TAP_MAJOR=tap_major, INPUT_PRECISION=_dot_precision(input.dtype), **flags,
        )
    if splits > 1:
        # the partial slices are added in index order: the same sum every run
        if compute_weight:
            grad_weight.copy_(weight_target.sum(0))
        if grad_bias is not None:
            grad_bias.copy_(bias_target.sum(0))


def conv2d_forward(input, weight, bias, residual, stride, padding, dilation, groups, output_size, activation,
                   negative_slope, save_pre_activation):
    """(out, pre): out = act(conv2d(input, weight, bias, stride, padding, dilation, groups) + residual),
    pre = the pre-activation conv2d(...) + residual when save_pre_activation, else None.

    input (N, Cin, H, W) and weight (Cout, Cin/groups, KH, KW) with any strides; bias (Cout,) or None;
    residual None or out's shape (any strides); padding = (top, left); positions past the input on
    any side read as zero, so torch's asymmetric 'same' padding is expressed through output_size.
    activation is one of conv_common.ACTIVATIONS (negative_slope is leaky_relu's). out and pre have
    input's dtype and memory format (channels_last iff shapes.is_channels_last(input)).
    """
    _check_operands(input, weight)
    batch, in_channels = input.shape[:2]
    cout, cin_per_group = weight.shape[:2]
    assert in_channels == cin_per_group * groups and cout % groups == 0, "conv2d: channels do not match groups"
    channels_last = is_channels_last(input)
    out = _empty_nhwc((batch, cout, *output_size), input.dtype, input.device)
    pre = _empty_nhwc(out.shape, input.dtype, input.device) if save_pre_activation else None
    assert residual is None or residual.shape == out.shape, "conv2d: residual must have the output's shape"
    assert bias is None or bias.shape == (cout,), "conv2d: bias must have shape (Cout,)"
    if out.numel() > 0:
        _launch_conv(_nhwc(input), _nhwc(weight), out, stride, padding, dilation, groups, transposed=False, bias=bias,
                     residual=None if residual is None else _nhwc(residual), pre=pre, activation=activation,
                     negative_slope=negative_slope)
    return _in_format(out, channels_last), None if pre is None else _in_format(pre, channels_last)


def conv2d_relu_forward(input, weight, bias, residual, stride, padding, dilation, groups, output_size):
    """conv2d_forward's out with activation "relu"."""
    out, _ = conv2d_forward(input, weight, bias, residual, stride, padding, dilation, groups, output_size, "relu",
                            0.0, False)
    return out


def conv2d_relu_maxpool2d_forward(input, weight, bias, stride, padding, dilation, groups, conv_output_size,
                                  pool_kernel_size, pool_stride, pool_padding, output_size):
    """(out, argmax): out = max_pool2d(relu(conv2d(input, weight, bias, ...)), pool_kernel_size,
    pool_stride, pool_padding) of size output_size, over a conv output of size conv_output_size;
    argmax = each maximum's position in its pool window (row * pool width + column), in
    shapes.window_index_dtype, as the max_pool2d ops save it. Both keep input's memory format.
    """
    _check_operands(input, weight)
    batch, in_channels = input.shape[:2]
    cout, cin_per_group, kh, kw = weight.shape
    assert in_channels == cin_per_group * groups and cout % groups == 0, "conv2d_relu: channels do not match groups"
    assert bias is None or bias.shape == (cout,), "conv2d_relu: bias must have shape (Cout,)"
    (pkh, pkw), (psh, psw), (pph, ppw) = pool_kernel_size, pool_stride, pool_padding
    channels_last = is_channels_last(input)
    out = _empty_nhwc((batch, cout, *output_size), input.dtype, input.device)
    argmax = _empty_nhwc(out.shape, window_index_dtype(pkh * pkw), input.device)
    if out.numel() == 0:
        return _in_format(out, channels_last), _in_format(argmax, channels_last)
    input, weight = _nhwc(input), _nhwc(weight)
    k_channels, n_channels, w_sk, w_sn, grid_groups = _forward_gemm_channels(weight, groups)
    m_total = batch * output_size[0] * output_size[1]

    def grid(meta):
        return (triton.cdiv(m_total, meta["BLOCK_M"]) * triton.cdiv(n_channels, meta["BLOCK_N"]), grid_groups)

    _conv2d_relu_maxpool2d_kernel[grid](
        input, weight, out, argmax, out if bias is None else bias,
        batch, input.shape[2], input.shape[3], *conv_output_size, *output_size, k_channels, n_channels,
        *input.stride(),
        w_sk, w_sn, weight.stride(2), weight.stride(3), (cout // groups) * weight.stride(0),
        *out.stride(),
        *argmax.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], psh, psw, pph, ppw,
        KH=kh, KW=kw, PKH=pkh, PKW=pkw, DEPTHWISE=_is_depthwise(weight, groups),
        POINTWISE=_is_pointwise(weight, groups, stride, padding), TAP_MAJOR=k_channels % _TAP_MAJOR_CHANNELS == 0,
        HAS_BIAS=bias is not None, INPUT_PRECISION=_dot_precision(input.dtype), GROUP_M=8,
    )
    return _in_format(out, channels_last), _in_format(argmax, channels_last)


def conv2d_backward(grad_out, saved, input, weight, stride, padding, dilation, groups, needs, channels_last,
                    activation, negative_slope):
    """(grad_input, grad_weight, grad_bias, grad_residual) of conv2d_forward, None where
    needs = (input, weight, bias, residual) is False. ``saved`` is what the activation's derivative is
    read from (the output or the pre-activation, see conv_common; None for "none").
    grad_input and grad_residual are channels_last iff ``channels_last`` (the forward's format).

    grad_pre (grad_out through the derivative) is written once by the weight-gradient kernel, which
    reads grad_out anyway, when it is needed beside the weight or bias gradients: as grad_residual, or
    as the input-gradient kernel's source, which then reads one tensor instead of grad_out and saved
    (the same bytes as writing it, and the derivative is not recomputed at every tap). Otherwise the
    input-gradient kernel takes the derivative as it loads. All sums are deterministic: the weight and
    bias reductions are split into slices added in a fixed order.
    """
    _check_operands(grad_out, input, weight, *([] if saved is None else [saved]))
    assert (saved is None) == (activation == "none"), "conv2d_backward: saved is needed exactly when there is an activation"
    need_input, need_weight, need_bias, need_residual = needs
    device = input.device
    grad_input = grad_weight = grad_bias = grad_pre = None
    if need_input:
        grad_input = _empty_nhwc(input.shape, input.dtype, device)
    if need_weight:
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device,
                                  memory_format=memory_format(is_channels_last(weight)))
    if need_bias:
        grad_bias = torch.empty(weight.shape[0], dtype=weight.dtype, device=device)
    if activation != "none" and (need_residual or (need_input and (need_weight or need_bias))):
        grad_pre = _empty_nhwc(grad_out.shape, grad_out.dtype, device)
    if grad_out.numel() == 0 or input.numel() == 0:
        for grad in (grad_input, grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
    else:
        grad_out, input, weight = _nhwc(grad_out), _nhwc(input), _nhwc(weight)
        saved = None if saved is None else _nhwc(saved)
        if need_weight or need_bias or grad_pre is not None:
            _launch_weight_grad(grad_out, saved, input, weight, grad_weight, grad_bias, grad_pre,
                                stride, padding, dilation, groups, activation, negative_slope)
        if need_input:
            if grad_pre is not None:
                _launch_conv(grad_pre, weight, grad_input, stride, padding, dilation, groups, transposed=True)
            else:
                _launch_conv(grad_out, weight, grad_input, stride, padding, dilation, groups, transposed=True,
                             saved=saved, grad_activation=activation, negative_slope=negative_slope)
    grad_residual = None
    if need_residual:  # without an activation grad_pre is grad_out: a copy, since an op's output never aliases
        grad_residual = grad_pre if activation != "none" else grad_out.clone(memory_format=torch.channels_last)
    return (None if grad_input is None else _in_format(grad_input, channels_last), grad_weight, grad_bias,
            None if grad_residual is None else _in_format(grad_residual, channels_last))


def conv2d_relu_backward(grad_out, out, input, weight, stride, padding, dilation, groups, needs, channels_last):
    """conv2d_backward with activation "relu", whose derivative the output gives."""
    return conv2d_backward(grad_out, out, input, weight, stride, padding, dilation, groups, needs, channels_last,
                           "relu", 0.0)
