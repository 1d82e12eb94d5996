"""2-D pooling kernels (max, average, adaptive average; forward and backward) and their launchers.

Every kernel walks its output (the pooled tensor, or grad_input for a backward) in memory order,
one [BLOCK_ROWS, BLOCK_INNER] tile per program: the inner axis is the contiguous run of the dense
layout (an H x W plane for NCHW, the channels for channels_last) and the rows enumerate the rest,
so that stores, and the loads of the window taps, coalesce. Inputs are read through their strides,
so any view works.

Backward kernels gather: each grad_input element sums the grad_output of the few windows that
contain it, so no atomics are needed and results are deterministic.

Channels and spatial sizes are compile-time constants like the window: a model has few distinct
pooling shapes, and constant sizes turn every index division into a multiply and let the compiler
prove the alignment that vectorized loads and stores need. The batch size stays a runtime value.

Launchers are pure: they allocate, pick block sizes, launch and return. Sizes come from
``vkernels.shapes``; nothing is validated beyond what the op layer already did.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vkernels import shapes

# Elements per program: 8 per thread at 4 warps, enough loads in flight to cover memory latency.
TILE_ELEMENTS = 1024
# Loads per element the full tile is sized for (a 3 x 3 window); larger windows get smaller tiles,
# so that the unrolled window loops stay within registers.
TILE_WINDOW_LOADS = 9
# Widest inner block: wider rows give no better coalescing, only fewer rows per tile.
MAX_BLOCK_INNER = 128
# Window elements side by side in adaptive pooling (NCHW): short segments of several rows per warp
# load, and few shuffle steps in the final cross-lane sum.
MAX_BLOCK_WINDOW = 8


# --------------------------------------------------------------------------------------------
# Shared index math


@triton.jit
def _tile_coordinates(
    num_rows,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    """(n, c, h, w) of this program's tile of a dense (N, C, H, W) tensor, its elements' offsets,
    and which of them exist. The inner axis is the tensor's contiguous run, one (n, c) plane (NCHW)
    or the channels of one position (channels_last); rows enumerate the rest. n, c, h, w come as
    [BLOCK_ROWS, 1] (per row) or [1, BLOCK_INNER] (per column) tensors that broadcast to the tile."""
    if CHANNELS_LAST:
        inner_size = C
    else:
        inner_size = H * W
    # one grid axis: the second one is limited to 65535 programs
    program = tl.program_id(0).to(INDEX_DTYPE)
    inner_blocks = (inner_size + BLOCK_INNER - 1) // BLOCK_INNER
    rows = program // inner_blocks * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    inner = program % inner_blocks * BLOCK_INNER + tl.arange(0, BLOCK_INNER)[None, :]
    if CHANNELS_LAST:  # rows are (n, h, w)
        w = rows % W
        h = rows // W % H
        n = rows // (W * H)
        c = inner
    else:  # rows are (n, c), the inner axis is (h, w)
        c = rows % C
        n = rows // C
        h = inner // W
        w = inner % W
    offsets = rows * inner_size + inner
    exists = (rows < num_rows) & (inner < inner_size)
    return n, c, h, w, offsets, exists


@triton.jit
def _first_window(
    index, PAD: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr
):
    """Along one axis, the first window (start o * STRIDE - PAD, span (KERNEL - 1) * DILATION + 1)
    that can contain input position `index`."""
    reach = index + PAD - (KERNEL - 1) * DILATION
    return (tl.maximum(reach, 0) + STRIDE - 1) // STRIDE


@triton.jit
def _window_tap(start, k, SIZE: tl.constexpr, DILATION: tl.constexpr):
    """Along one axis, the input position of tap k of the window starting at `start`, and whether it
    lies inside the input (padding does not)."""
    index = start + k * DILATION
    return index, (index >= 0) & (index < SIZE)


@triton.jit
def _candidate_window(
    index, first, a, OUT_SIZE: tl.constexpr, PAD: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr
):
    """Along one axis, window o = first + a (first from _first_window), the distance from its start to
    input position `index`, and whether window o exists and has `index` as its tap distance / DILATION:
    the distance is a non-negative multiple of DILATION (tap < KERNEL holds for every o >= first)."""
    o = first + a
    distance = index + PAD - o * STRIDE
    contains = (o < OUT_SIZE) & (distance >= 0) & (distance % DILATION == 0)
    return o, distance, contains


@triton.jit
def _avg_window_length(
    index, SIZE: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr,
):
    """torch's avg_pool2d divisor factor along one axis: window `index` clipped to the padded input,
    or to the input itself without count_include_pad."""
    start = index * STRIDE - PAD
    end = tl.minimum(start + KERNEL, SIZE + PAD)
    if not COUNT_INCLUDE_PAD:
        start = tl.maximum(start, 0)
        end = tl.minimum(end, SIZE)
    return end - start


@triton.jit
def _adaptive_start(index, IN_SIZE: tl.constexpr, OUT_SIZE: tl.constexpr):
    return (index * IN_SIZE) // OUT_SIZE


@triton.jit
def _adaptive_end(index, IN_SIZE: tl.constexpr, OUT_SIZE: tl.constexpr):
    return ((index + 1) * IN_SIZE + OUT_SIZE - 1) // OUT_SIZE


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _max_pool2d_forward_kernel(
    x_ptr, out_ptr, argmax_ptr, num_rows,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    n, c, oh, ow, out_offsets, exists = _tile_coordinates(
        num_rows, C, OH, OW, CHANNELS_LAST, INDEX_DTYPE, BLOCK_ROWS, BLOCK_INNER
    )
    x_plane = x_ptr + (n * x_stride_n + c * x_stride_c)
    ih_start = oh * SH - PH
    iw_start = ow * SW - PW
    # torch's selection: the first valid window element unless a later one is greater or NaN
    first_i = (tl.maximum(-ih_start, 0) + DH - 1) // DH
    first_j = (tl.maximum(-iw_start, 0) + DW - 1) // DW
    best_offset = first_i * KW + first_j + tl.zeros([BLOCK_ROWS, BLOCK_INNER], tl.int32)
    best = tl.full([BLOCK_ROWS, BLOCK_INNER], float("-inf"), ACC_DTYPE)
    for i in tl.static_range(KH):
        ih, row_valid = _window_tap(ih_start, i, H, DH)
        for j in tl.static_range(KW):
            iw, column_valid = _window_tap(iw_start, j, W, DW)
            valid = exists & row_valid & column_valid
            # masked taps read -inf, which never wins
            value = tl.load(x_plane + ih * x_stride_h + iw * x_stride_w, mask=valid, other=float("-inf"))
            value = value.to(ACC_DTYPE)
            take = (value > best) | (value != value)
            best_offset = tl.where(take, i * KW + j, best_offset)
            # = tl.where(take, value, best) up to the sign of a zero maximum, in one instruction
            best = tl.maximum(best, value, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + out_offsets, best.to(out_ptr.dtype.element_ty), mask=exists)
    tl.store(argmax_ptr + out_offsets, best_offset.to(argmax_ptr.dtype.element_ty), mask=exists)


@triton.jit
def _max_pool2d_backward_kernel(
    grad_output_ptr, argmax_ptr, grad_input_ptr, num_rows,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    am_stride_n, am_stride_c, am_stride_h, am_stride_w,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CANDIDATES_H: tl.constexpr, CANDIDATES_W: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    n, c, ih, iw, gi_offsets, exists = _tile_coordinates(
        num_rows, C, H, W, CHANNELS_LAST, INDEX_DTYPE, BLOCK_ROWS, BLOCK_INNER
    )
    go_plane = grad_output_ptr + (n * go_stride_n + c * go_stride_c)
    am_plane = argmax_ptr + (n * am_stride_n + c * am_stride_c)
    oh_first = _first_window(ih, PH, KH, SH, DH)
    ow_first = _first_window(iw, PW, KW, SW, DW)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_INNER], ACC_DTYPE)
    for a in tl.static_range(CANDIDATES_H):
        oh, h_distance, row_valid = _candidate_window(ih, oh_first, a, OH, PH, SH, DH)
        for b in tl.static_range(CANDIDATES_W):
            ow, w_distance, column_valid = _candidate_window(iw, ow_first, b, OW, PW, SW, DW)
            valid = exists & row_valid & column_valid
            argmax = tl.load(am_plane + oh * am_stride_h + ow * am_stride_w, mask=valid, other=-1)
            grad = tl.load(go_plane + oh * go_stride_h + ow * go_stride_w, mask=valid, other=0)
            window_offset = (h_distance // DH) * KW + w_distance // DW
            acc += tl.where(argmax == window_offset, grad.to(ACC_DTYPE), 0)
    tl.store(grad_input_ptr + gi_offsets, acc.to(grad_input_ptr.dtype.element_ty), mask=exists)


@triton.jit
def _avg_pool2d_forward_kernel(
    x_ptr, out_ptr, num_rows,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR_OVERRIDE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    n, c, oh, ow, out_offsets, exists = _tile_coordinates(
        num_rows, C, OH, OW, CHANNELS_LAST, INDEX_DTYPE, BLOCK_ROWS, BLOCK_INNER
    )
    x_plane = x_ptr + (n * x_stride_n + c * x_stride_c)
    ih_start = oh * SH - PH
    iw_start = ow * SW - PW
    acc = tl.zeros([BLOCK_ROWS, BLOCK_INNER], ACC_DTYPE)
    for i in tl.static_range(KH):
        ih, row_valid = _window_tap(ih_start, i, H, 1)
        for j in tl.static_range(KW):
            iw, column_valid = _window_tap(iw_start, j, W, 1)
            valid = exists & row_valid & column_valid
            acc += tl.load(x_plane + ih * x_stride_h + iw * x_stride_w, mask=valid, other=0).to(ACC_DTYPE)
    if DIVISOR_OVERRIDE:
        divisor = DIVISOR_OVERRIDE
    else:
        h_length = _avg_window_length(oh, H, KH, SH, PH, COUNT_INCLUDE_PAD)
        w_length = _avg_window_length(ow, W, KW, SW, PW, COUNT_INCLUDE_PAD)
        # every real window holds an input element; lanes past the tile's edge may not
        divisor = tl.maximum(h_length * w_length, 1)
    tl.store(out_ptr + out_offsets, (acc / divisor).to(out_ptr.dtype.element_ty), mask=exists)


@triton.jit
def _avg_pool2d_backward_kernel(
    grad_output_ptr, grad_input_ptr, num_rows,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR_OVERRIDE: tl.constexpr,
    CANDIDATES_H: tl.constexpr, CANDIDATES_W: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    n, c, ih, iw, gi_offsets, exists = _tile_coordinates(
        num_rows, C, H, W, CHANNELS_LAST, INDEX_DTYPE, BLOCK_ROWS, BLOCK_INNER
    )
    go_plane = grad_output_ptr + (n * go_stride_n + c * go_stride_c)
    oh_first = _first_window(ih, PH, KH, SH, 1)
    ow_first = _first_window(iw, PW, KW, SW, 1)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_INNER], ACC_DTYPE)
    for a in tl.static_range(CANDIDATES_H):
        oh, _, row_valid = _candidate_window(ih, oh_first, a, OH, PH, SH, 1)
        # The divisor is an oh factor times an ow factor: their reciprocals, computed on the row or
        # column vectors of the tile, replace a division per element and candidate. Masked
        # candidates may have an empty window: keep their factor finite.
        h_scale = 1.0 / tl.maximum(_avg_window_length(oh, H, KH, SH, PH, COUNT_INCLUDE_PAD), 1).to(ACC_DTYPE)
        for b in tl.static_range(CANDIDATES_W):
            ow, _, column_valid = _candidate_window(iw, ow_first, b, OW, PW, SW, 1)
            valid = exists & row_valid & column_valid
            grad = tl.load(go_plane + oh * go_stride_h + ow * go_stride_w, mask=valid, other=0).to(ACC_DTYPE)
            if DIVISOR_OVERRIDE:
                acc += grad
            else:
                w_length = _avg_window_length(ow, W, KW, SW, PW, COUNT_INCLUDE_PAD)
                acc += grad * h_scale * (1.0 / tl.maximum(w_length, 1).to(ACC_DTYPE))
    if DIVISOR_OVERRIDE:
        acc = acc / DIVISOR_OVERRIDE
    tl.store(grad_input_ptr + gi_offsets, acc.to(grad_input_ptr.dtype.element_ty), mask=exists)


@triton.jit
def _adaptive_avg_pool2d_forward_kernel(
    x_ptr, out_ptr, num_rows,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    MAX_KH: tl.constexpr, MAX_KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_WINDOW: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    n, c, oh, ow, out_offsets, exists = _tile_coordinates(
        num_rows, C, OH, OW, CHANNELS_LAST, INDEX_DTYPE, BLOCK_ROWS, BLOCK_INNER
    )
    h_start = _adaptive_start(oh, H, OH)
    h_end = _adaptive_end(oh, H, OH)
    w_start = _adaptive_start(ow, W, OW)
    w_end = _adaptive_end(ow, W, OW)
    # Window elements form a middle tile axis: in NCHW a block of consecutive window elements is
    # (mostly) contiguous memory across the lanes of a warp, e.g. a whole plane in global average
    # pooling. Partial sums stay per lane over the window blocks; one cross-lane sum at the end.
    x_plane = tl.expand_dims(x_ptr + (n * x_stride_n + c * x_stride_c), 1)
    h_start3 = tl.expand_dims(h_start, 1)
    w_start3 = tl.expand_dims(w_start, 1)
    h_end3 = tl.expand_dims(h_end, 1)
    w_end3 = tl.expand_dims(w_end, 1)
    exists3 = tl.expand_dims(exists, 1)
    partial_sums = tl.zeros([BLOCK_ROWS, BLOCK_WINDOW, BLOCK_INNER], ACC_DTYPE)
    for window_start in range(0, MAX_KH * MAX_KW, BLOCK_WINDOW):
        k = window_start + tl.arange(0, BLOCK_WINDOW)[None, :, None]
        # taps past MAX_KH * MAX_KW land on rows >= h_end: masked
        ih = h_start3 + k // MAX_KW
        iw = w_start3 + k % MAX_KW
        valid = exists3 & (ih < h_end3) & (iw < w_end3)
        partial_sums += tl.load(x_plane + ih * x_stride_h + iw * x_stride_w, mask=valid, other=0).to(ACC_DTYPE)
    mean = tl.sum(partial_sums, axis=1) / ((h_end - h_start) * (w_end - w_start))
    tl.store(out_ptr + out_offsets, mean.to(out_ptr.dtype.element_ty), mask=exists)


@triton.jit
def _adaptive_avg_pool2d_backward_kernel(
    grad_output_ptr, grad_input_ptr, num_rows,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    CANDIDATES_H: tl.constexpr, CANDIDATES_W: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    n, c, ih, iw, gi_offsets, exists = _tile_coordinates(
        num_rows, C, H, W, CHANNELS_LAST, INDEX_DTYPE, BLOCK_ROWS, BLOCK_INNER
    )
    go_plane = grad_output_ptr + (n * go_stride_n + c * go_stride_c)
    # input row ih lies in output rows [floor(ih * OH / H), ceil((ih + 1) * OH / H)): the adaptive
    # window rule with the roles of input and output swapped
    oh_first = _adaptive_start(ih, OH, H)
    oh_end = _adaptive_end(ih, OH, H)
    ow_first = _adaptive_start(iw, OW, W)
    ow_end = _adaptive_end(iw, OW, W)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_INNER], ACC_DTYPE)
    # runtime loops: upsampling (OH > H) can make the candidate count large
    for a in range(CANDIDATES_H):
        oh = oh_first + a
        # window size = oh factor x ow factor: multiply by their reciprocals (see avg_pool2d)
        h_length = _adaptive_end(oh, H, OH) - _adaptive_start(oh, H, OH)
        h_scale = 1.0 / tl.maximum(h_length, 1).to(ACC_DTYPE)
        for b in range(CANDIDATES_W):
            ow = ow_first + b
            valid = exists & (oh < oh_end) & (ow < ow_end)
            w_length = _adaptive_end(ow, W, OW) - _adaptive_start(ow, W, OW)
            grad = tl.load(go_plane + oh * go_stride_h + ow * go_stride_w, mask=valid, other=0).to(ACC_DTYPE)
            acc += grad * h_scale * (1.0 / tl.maximum(w_length, 1).to(ACC_DTYPE))
    tl.store(grad_input_ptr + gi_offsets, acc.to(grad_input_ptr.dtype.element_ty), mask=exists)


# --------------------------------------------------------------------------------------------
# Launchers


def _accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _index_dtype(*tensors: torch.Tensor, products: tuple[int, ...] = ()) -> tl.dtype:
    """int32 index arithmetic when every offset into every tensor (with a step of slack on each axis,
    for masked lanes past the edge) and every extra product fits, int64 otherwise: int64 division
    and addressing cost several instructions each."""
    largest = max((sum(size * stride for size, stride in zip(t.shape, t.stride())) for t in tensors), default=0)
    return tl.int32 if max(largest, *products, 0) < 2**31 else tl.int64


def _tile_blocks(shape, channels_last: bool, window_loads: int, tile_elements: int = TILE_ELEMENTS) -> dict:
    """Block sizes, row count and grid of the tiling of a dense (N, C, H, W) tensor, for kernels
    that load `window_loads` values per element."""
    batch, channels, height, width = shape
    inner = channels if channels_last else height * width
    num_rows = batch * channels * height * width // inner
    block_inner = min(triton.next_power_of_2(inner), MAX_BLOCK_INNER)
    rows = max(1, tile_elements * TILE_WINDOW_LOADS // max(window_loads, TILE_WINDOW_LOADS) // block_inner)
    block_rows = min(1 << (rows.bit_length() - 1), triton.next_power_of_2(num_rows))  # powers of 2
    return {
        "num_rows": num_rows,
        "grid": (triton.cdiv(num_rows, block_rows) * triton.cdiv(inner, block_inner),),
        "BLOCK_ROWS": block_rows,
        "BLOCK_INNER": block_inner,
        "CHANNELS_LAST": channels_last,
    }


def _sizes(channels: int, input_size, output_size) -> dict:
    (height, width), (out_height, out_width) = input_size, output_size
    return {"C": channels, "H": height, "W": width, "OH": out_height, "OW": out_width}


def _empty_pooled(input: torch.Tensor, size, channels_last: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(
        (*input.shape[:2], *size),
        dtype=dtype or input.dtype,
        device=input.device,
        memory_format=shapes.memory_format(channels_last),
    )


def _candidates(kernel: int, stride: int, dilation: int = 1) -> int:
    """Most windows along one axis that contain a given input position."""
    return triton.cdiv((kernel - 1) * dilation + 1, stride)


def max_pool2d_forward(input, kernel_size, stride, padding, dilation, output_size):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    channels_last = shapes.is_channels_last(input)
    out = _empty_pooled(input, output_size, channels_last)
    argmax = _empty_pooled(input, output_size, channels_last, shapes.window_index_dtype(kh * kw))
    if out.numel() == 0:
        return out, argmax
    blocks = _tile_blocks(out.shape, channels_last, kh * kw)
    _max_pool2d_forward_kernel[blocks.pop("grid")](
        input, out, argmax, blocks.pop("num_rows"), *input.stride(),
        **_sizes(input.shape[1], input.shape[2:], output_size),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        ACC_DTYPE=_accumulator_dtype(input.dtype), INDEX_DTYPE=_index_dtype(input, out), **blocks,
    )
    return out, argmax


def max_pool2d_backward(grad_output, argmax, input_size, kernel_size, stride, padding, dilation, channels_last):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    grad_input = _empty_pooled(grad_output, input_size, channels_last)
    if grad_input.numel() == 0:
        return grad_input
    candidates_h, candidates_w = _candidates(kh, sh, dh), _candidates(kw, sw, dw)
    blocks = _tile_blocks(grad_input.shape, channels_last, 2 * candidates_h * candidates_w)
    _max_pool2d_backward_kernel[blocks.pop("grid")](
        grad_output, argmax, grad_input, blocks.pop("num_rows"), *grad_output.stride(), *argmax.stride(),
        **_sizes(grad_output.shape[1], input_size, grad_output.shape[2:]),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        CANDIDATES_H=candidates_h, CANDIDATES_W=candidates_w,
        ACC_DTYPE=_accumulator_dtype(grad_output.dtype), INDEX_DTYPE=_index_dtype(grad_output, argmax, grad_input),
        **blocks,
    )
    return grad_input


def avg_pool2d_forward(input, kernel_size, stride, padding, output_size, count_include_pad, divisor_override):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    channels_last = shapes.is_channels_last(input)
    out = _empty_pooled(input, output_size, channels_last)
    if out.numel() == 0:
        return out
    blocks = _tile_blocks(out.shape, channels_last, kh * kw)
    _avg_pool2d_forward_kernel[blocks.pop("grid")](
        input, out, blocks.pop("num_rows"), *input.stride(),
        **_sizes(input.shape[1], input.shape[2:], output_size),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
        COUNT_INCLUDE_PAD=count_include_pad, DIVISOR_OVERRIDE=divisor_override or 0,
        ACC_DTYPE=_accumulator_dtype(input.dtype), INDEX_DTYPE=_index_dtype(input, out), **blocks,
    )
    return out


def avg_pool2d_backward(
    grad_output, input_size, kernel_size, stride, padding, count_include_pad, divisor_override, channels_last
):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    grad_input = _empty_pooled(grad_output, input_size, channels_last)
    if grad_input.numel() == 0:
        return grad_input
    candidates_h, candidates_w = _candidates(kh, sh), _candidates(kw, sw)
    blocks = _tile_blocks(grad_input.shape, channels_last, candidates_h * candidates_w)
    _avg_pool2d_backward_kernel[blocks.pop("grid")](
        grad_output, grad_input, blocks.pop("num_rows"), *grad_output.stride(),
        **_sizes(grad_output.shape[1], input_size, grad_output.shape[2:]),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
        COUNT_INCLUDE_PAD=count_include_pad, DIVISOR_OVERRIDE=divisor_override or 0,
        CANDIDATES_H=candidates_h, CANDIDATES_W=candidates_w,
        ACC_DTYPE=_accumulator_dtype(grad_output.dtype), INDEX_DTYPE=_index_dtype(grad_output, grad_input),
        **blocks,
    )
    return grad_input


def adaptive_avg_pool2d_forward(input, output_size):
    (height, width), (out_height, out_width) = input.shape[2:], output_size
    channels_last = shapes.is_channels_last(input)
    out = _empty_pooled(input, output_size, channels_last)
    if out.numel() == 0:
        return out
    max_kh = shapes.adaptive_max_window(height, out_height)
    max_kw = shapes.adaptive_max_window(width, out_width)
    # the window axis takes the lanes of a warp the inner block leaves free
    inner = input.shape[1] if channels_last else out_height * out_width
    block_inner = min(triton.next_power_of_2(inner), MAX_BLOCK_INNER)
    block_window = min(triton.next_power_of_2(max_kh * max_kw), max(1, MAX_BLOCK_WINDOW // block_inner))
    # window blocks are a loop, not unrolled: no register limit on the window
    blocks = _tile_blocks(out.shape, channels_last, 1, max(1, TILE_ELEMENTS // block_window))
    _adaptive_avg_pool2d_forward_kernel[blocks.pop("grid")](
        input, out, blocks.pop("num_rows"), *input.stride(),
        **_sizes(input.shape[1], input.shape[2:], output_size), MAX_KH=max_kh, MAX_KW=max_kw,
        ACC_DTYPE=_accumulator_dtype(input.dtype),
        INDEX_DTYPE=_index_dtype(input, out, products=((out_height + 1) * height, (out_width + 1) * width)),
        BLOCK_WINDOW=block_window, **blocks,
    )
    return out


def adaptive_avg_pool2d_backward(grad_output, input_size, channels_last):
    (height, width), (out_height, out_width) = input_size, grad_output.shape[2:]
    grad_input = _empty_pooled(grad_output, input_size, channels_last)
    if grad_input.numel() == 0:
        return grad_input
    if grad_output.numel() == 0:  # an empty output pools nothing: no gradient flows back
        return grad_input.zero_()
    blocks = _tile_blocks(grad_input.shape, channels_last, 1)  # candidate loops are not unrolled
    _adaptive_avg_pool2d_backward_kernel[blocks.pop("grid")](
        grad_output, grad_input, blocks.pop("num_rows"), *grad_output.stride(),
        **_sizes(grad_output.shape[1], input_size, grad_output.shape[2:]),
        CANDIDATES_H=shapes.adaptive_max_window(out_height, height),
        CANDIDATES_W=shapes.adaptive_max_window(out_width, width),
        ACC_DTYPE=_accumulator_dtype(grad_output.dtype),
        INDEX_DTYPE=_index_dtype(
            grad_output, grad_input, products=((height + 1) * out_height, (width + 1) * out_width)
        ),
        **blocks,
    )
    return grad_input
