"""Direct depthwise conv2d kernels (groups == in channels == out channels): forward with the conv
epilogue, input gradient and weight gradient. Launched by vkernels.triton_kernels.conv.

A depthwise conv sums over taps only, never over channels: KH*KW multiply-adds per output element,
about 4 FLOP per byte moved at 3x3 in 16-bit, far below what a GPU needs to be compute-bound. So no
GEMM tiles (which would pad the missing channel reduction with zeros): each program owns a
[BLOCK_M pixels x BLOCK_C channels] tile of an NHWC tensor, every tap is one load of BLOCK_M
contiguous runs of BLOCK_C channels times a vector of BLOCK_C weights (a row of taps unrolled, KW
constexpr); the overlapping input rows of neighbouring taps and pixels come from L1/L2.

- forward: out[p, c] = act(sum over taps of input[p*stride + tap*dilation - pad, c] * w[c, tap] + bias
  + residual), pre-activation stored too when the backward needs it;
- input gradient (TRANSPOSED): the same tile gathering instead of scattering, so no atomics:
  grad_input[i, c] = sum over taps whose (i + pad - tap*dilation) is a multiple of stride of
  grad_pre[(i + pad - tap*dilation) / stride, c] * w[c, tap];
- weight gradient: each program reduces one channel block over a fixed slice of the pixels, all taps
  at once as a [BLOCK_M, TAPS, BLOCK_C] gather of the input against the [BLOCK_M, BLOCK_C] gradient
  tile; the slices' partial sums are added in a fixed order by the launcher (deterministic). The
  same program sums grad_bias and, when asked, writes grad_pre (grad_out through the activation's
  derivative) for the input gradient and the residual.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vkernels.triton_kernels.autotuning import INTERPRETED, autotune
from vkernels.triton_kernels.conv_common import conv_epilogue, load_grad, output_pixels, split_blocks

# (BLOCK_M, BLOCK_C, num_warps); the interpreter runs one tile so CPU runs never benchmark
_FORWARD_TILES = [(64, 64, 8), (32, 64, 4), (128, 32, 8), (32, 128, 8), (64, 32, 4)]
_WEIGHT_GRAD_TILES = [(32, 32, 4), (16, 64, 4), (64, 32, 8), (16, 32, 4), (8, 32, 4), (4, 32, 4)]
# Elements of the weight gradient's [BLOCK_M, TAPS, BLOCK_C] input gather per warp: 64 fp32 registers
# a thread, so that 3x3 (16 padded taps) and 7x7 (64) tiles both stay in registers
_GATHER_ELEMENTS_PER_WARP = 2048


def _configs(tiles, interpreted_tile):
    if INTERPRETED:  # its cost is per operation, not per element: few, long tiles
        tiles = [interpreted_tile]
    return [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=warps, num_stages=1) for m, c, warps in tiles]


def _fit_gather(configs, args):
    """Weight-gradient configs whose input gather fits in registers for this kernel size (at least the
    smallest one)."""
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] * args["TAPS"] * c.kwargs["BLOCK_C"]
               <= _GATHER_ELEMENTS_PER_WARP * c.num_warps]
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_C"])]


@triton.jit
def depthwise_tile(src_ptr, s_sn, s_sc, s_sh, s_sw, saved_ptr, w_ptr, w_sc, w_sh, w_sw,
                   n, dst_h, dst_w, m_ok, channel, c_ok, SRC_H, SRC_W, SH, SW, PH, PW, DH, DW, negative_slope,
                   KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr, GRAD_ACTIVATION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_C] sum over taps at destination pixels (n, dst_h, dst_w): the forward
    reads src at dst*stride + tap*dilation - pad; TRANSPOSED reads src (the gradient, through
    GRAD_ACTIVATION's derivative of the saved tensor, which src's offsets address too) at
    (dst + pad - tap*dilation) / stride where that divides exactly."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    image = n * s_sn
    channel_offsets = (channel * s_sc)[None, :]
    weights = w_ptr + channel * w_sc
    # rows of taps loop, columns unroll: unrolling all KH*KW taps let the compiler hoist every load
    # (5x5 and 7x7 spilled 1-16 KB/thread on sm_90)
    for kh in range(KH):
        if TRANSPOSED:
            shifted_h = dst_h + PH - kh * DH
            src_h = shifted_h // SH
            h_ok = m_ok & (shifted_h >= 0) & (shifted_h % SH == 0) & (src_h < SRC_H)
        else:
            src_h = dst_h * SH + kh * DH - PH
            h_ok = m_ok & (src_h >= 0) & (src_h < SRC_H)
        row = image + src_h * s_sh
        for kw in tl.static_range(KW):
            if TRANSPOSED:
                shifted_w = dst_w + PW - kw * DW
                src_w = shifted_w // SW
                w_ok = (shifted_w >= 0) & (shifted_w % SW == 0) & (src_w < SRC_W)
            else:
                src_w = dst_w * SW + kw * DW - PW
                w_ok = (src_w >= 0) & (src_w < SRC_W)
            value = load_grad(src_ptr, saved_ptr, (row + src_w * s_sw)[:, None] + channel_offsets,
                              (h_ok & w_ok)[:, None] & c_ok[None, :], GRAD_ACTIVATION, negative_slope)
            weight = tl.load(weights + (kh * w_sh + kw * w_sw), mask=c_ok, other=0.0)
            acc += value.to(tl.float32) * weight.to(tl.float32)[None, :]
    return acc


@autotune(
    _configs(_FORWARD_TILES, (128, 16, 4)),
    key=["BATCH", "SRC_H", "SRC_W", "DST_H", "DST_W", "C", "SH", "SW", "DH", "DW", "KH", "KW", "TRANSPOSED"],
    sizes=("BATCH", "SRC_H", "SRC_W", "DST_H", "DST_W", "C"),
)
@triton.jit
def depthwise_conv2d_kernel(
    src_ptr, weight_ptr, dst_ptr, bias_ptr, residual_ptr, pre_ptr, saved_ptr,
    BATCH, SRC_H, SRC_W, DST_H, DST_W, C,
    s_sn, s_sc, s_sh, s_sw,
    w_sc, w_sh, w_sw,
    d_sn, d_sc, d_sh, d_sw,
    SH, SW, PH, PW, DH, DW, negative_slope,
    KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr, GRAD_ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[pixel, c] = epilogue(sum over taps of src * weight[c, tap]). Forward: src = input, dst = out
    (residual and pre addressed like dst); TRANSPOSED: src = grad_out or grad_pre (saved addressed like
    src), dst = grad_input, no epilogue. Grid: (pixel tiles, channel tiles)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < BATCH * DST_H * DST_W
    n = (offs_m // (DST_H * DST_W)).to(tl.int64)
    dst_h = (offs_m % (DST_H * DST_W)) // DST_W
    dst_w = offs_m % DST_W
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channel < C
    acc = depthwise_tile(src_ptr, s_sn, s_sc, s_sh, s_sw, saved_ptr, weight_ptr, w_sc, w_sh, w_sw,
                         n, dst_h, dst_w, m_ok, channel, c_ok, SRC_H, SRC_W, SH, SW, PH, PW, DH, DW, negative_slope,
                         KH, KW, TRANSPOSED, GRAD_ACTIVATION, BLOCK_M, BLOCK_C)
    out_ok = m_ok[:, None] & c_ok[None, :]
    out_offsets = (n * d_sn + dst_h * d_sh + dst_w * d_sw)[:, None] + (channel * d_sc)[None, :]
    acc = conv_epilogue(acc, bias_ptr, channel, c_ok, residual_ptr, pre_ptr, out_offsets, out_ok, negative_slope,
                        HAS_BIAS, HAS_RESIDUAL, STORE_PRE, ACTIVATION)
    tl.store(dst_ptr + out_offsets, acc.to(dst_ptr.dtype.element_ty), mask=out_ok)


@autotune(
    _configs(_WEIGHT_GRAD_TILES, (32, 16, 4)),
    key=["BATCH", "H", "W", "OH", "OW", "C", "SH", "SW", "DH", "DW", "KH", "KW", "COMPUTE_WEIGHT"],
    sizes=("BATCH", "H", "W", "OH", "OW", "C"),
    prune=_fit_gather,
)
@triton.jit
def depthwise_conv2d_weight_grad_kernel(
    input_ptr, grad_ptr, saved_ptr, grad_weight_ptr, grad_bias_ptr, grad_pre_ptr,
    BATCH, H, W, OH, OW, C,
    x_sn, x_sc, x_sh, x_sw,
    g_sn, g_sc, g_sh, g_sw,
    gw_split, gw_sc, gw_sh, gw_sw, gb_split,
    SH, SW, PH, PW, DH, DW, negative_slope,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr, GRAD_ACTIVATION: tl.constexpr,
    COMPUTE_WEIGHT: tl.constexpr, COMPUTE_BIAS: tl.constexpr, WRITE_GRAD_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_weight[c, tap] = sum over output pixels of grad_pre[pixel, c] * input[pixel moved by tap, c]
    (TAPS = KH*KW padded to a power of two), grad_bias[c] = sum of grad_pre, grad_pre itself when
    WRITE_GRAD_PRE (grad_out, saved and grad_pre are addressed alike). Grid: (channel tiles, splits);
    split s sums its own contiguous range of pixel blocks into slice s of the partial outputs
    (gw_split / gb_split apart)."""
    channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channel < C
    split = tl.program_id(1)
    m_total = BATCH * OH * OW
    first_block, last_block = split_blocks(split, tl.num_programs(1), m_total, BLOCK_M)

    tap = tl.arange(0, TAPS)
    tap_ok = tap < KH * KW
    shift_h = (tap // KW) * DH - PH
    shift_w = (tap % KW) * DW - PW
    grad_channels = (channel * g_sc)[None, :]
    input_channels = (channel * x_sc)[None, None, :]
    acc = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for block in range(first_block, last_block):
        m_ok, n, oh, ow = output_pixels(block, m_total, OH, OW, BLOCK_M)
        g_ok = m_ok[:, None] & c_ok[None, :]
        g_offsets = (n * g_sn + oh * g_sh + ow * g_sw)[:, None] + grad_channels
        g = load_grad(grad_ptr, saved_ptr, g_offsets, g_ok, GRAD_ACTIVATION, negative_slope)
        if WRITE_GRAD_PRE:
            tl.store(grad_pre_ptr + g_offsets, g, mask=g_ok)
        g = g.to(tl.float32)
        if COMPUTE_BIAS:
            bias_acc += tl.sum(g, axis=0)
        if COMPUTE_WEIGHT:
            ih = (oh * SH)[:, None] + shift_h[None, :]
            iw = (ow * SW)[:, None] + shift_w[None, :]
            x_ok = (m_ok[:, None] & tap_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, :, None]
            pixel = n[:, None] * x_sn + ih * x_sh + iw * x_sw
            x = tl.load(input_ptr + (pixel[:, :, None] + input_channels), mask=x_ok & c_ok[None, None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32) * g[:, None, :], axis=0)

    if COMPUTE_WEIGHT:
        weight_offsets = ((tap // KW) * gw_sh + (tap % KW) * gw_sw)[:, None] + (channel * gw_sc)[None, :]
        tl.store(grad_weight_ptr + split * gw_split + weight_offsets, acc.to(grad_weight_ptr.dtype.element_ty),
                 mask=tap_ok[:, None] & c_ok[None, :])
    if COMPUTE_BIAS:
        tl.store(grad_bias_ptr + split * gb_split + channel, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=c_ok)
