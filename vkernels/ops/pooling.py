"""2-D pooling: max, average and adaptive average, forward and backward.

Each kernel backend (``triton``, ``cuda``) has its own ops ``vkernels::<op>_<backend>`` with one
schema written here; the Triton ops are implemented here by the launchers in
``vkernels.triton_kernels.pooling``, the CUDA ops in C++ (csrc/cuda/pooling.cu). Both share the fake
kernels and autograd below. The public functions mirror ``torch.nn.functional`` and pick a backend
per call (``vkernels.dispatch.choose``); the ``torch`` backend calls ``torch.nn.functional``.

Max-pool saves for its backward the position of the maximum inside its window in the smallest
integer type that holds it (1 byte for windows up to 128 elements) instead of int64 input indices;
``return_indices=True`` turns those positions into torch's flat ``h * W + w`` indices.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vkernels import dispatch
from vkernels.ops.library import backend_op, define_backend_ops
from vkernels.shapes import (
    adaptive_output_size,
    check_pool_input,
    is_channels_last,
    memory_format,
    pair,
    pool2d_output_size,
    pool_stride,
    window_index_dtype,
)
from vkernels.triton_kernels import pooling as triton_pooling

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SCHEMAS = {
    "max_pool2d": "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
    "int[2] output_size) -> (Tensor, Tensor)",
    "max_pool2d_backward": "(Tensor grad_output, Tensor argmax, int[2] input_size, int[2] kernel_size, "
    "int[2] stride, int[2] padding, int[2] dilation, bool channels_last) -> Tensor",
    "avg_pool2d": "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] output_size, "
    "bool count_include_pad, int? divisor_override) -> Tensor",
    "avg_pool2d_backward": "(Tensor grad_output, int[2] input_size, int[2] kernel_size, int[2] stride, "
    "int[2] padding, bool count_include_pad, int? divisor_override, bool channels_last) -> Tensor",
    "adaptive_avg_pool2d": "(Tensor input, int[2] output_size) -> Tensor",
    "adaptive_avg_pool2d_backward": "(Tensor grad_output, int[2] input_size, bool channels_last) -> Tensor",
}
TRITON_LAUNCHERS = {
    "max_pool2d": triton_pooling.max_pool2d_forward,
    "max_pool2d_backward": triton_pooling.max_pool2d_backward,
    "avg_pool2d": triton_pooling.avg_pool2d_forward,
    "avg_pool2d_backward": triton_pooling.avg_pool2d_backward,
    "adaptive_avg_pool2d": triton_pooling.adaptive_avg_pool2d_forward,
    "adaptive_avg_pool2d_backward": triton_pooling.adaptive_avg_pool2d_backward,
}


# Fake kernels: shapes, dtypes and memory formats of the outputs, shared by both backends.


def _pooled_like(input: torch.Tensor, output_size: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(
        (*input.shape[:2], *output_size),
        dtype=dtype or input.dtype,
        device=input.device,
        memory_format=memory_format(is_channels_last(input)),
    )


def _gradient_like(grad_output: torch.Tensor, input_size: Sequence[int], channels_last: bool) -> torch.Tensor:
    return torch.empty(
        (*grad_output.shape[:2], *input_size),
        dtype=grad_output.dtype,
        device=grad_output.device,
        memory_format=memory_format(channels_last),
    )


def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, output_size):
    argmax_dtype = window_index_dtype(kernel_size[0] * kernel_size[1])
    return _pooled_like(input, output_size), _pooled_like(input, output_size, argmax_dtype)


def _max_pool2d_backward_fake(grad_output, argmax, input_size, kernel_size, stride, padding, dilation, channels_last):
    return _gradient_like(grad_output, input_size, channels_last)


def _avg_pool2d_fake(input, kernel_size, stride, padding, output_size, count_include_pad, divisor_override):
    return _pooled_like(input, output_size)


def _avg_pool2d_backward_fake(
    grad_output, input_size, kernel_size, stride, padding, count_include_pad, divisor_override, channels_last
):
    return _gradient_like(grad_output, input_size, channels_last)


def _adaptive_avg_pool2d_fake(input, output_size):
    return _pooled_like(input, output_size)


def _adaptive_avg_pool2d_backward_fake(grad_output, input_size, channels_last):
    return _gradient_like(grad_output, input_size, channels_last)


_FAKES = {
    "max_pool2d": _max_pool2d_fake,
    "max_pool2d_backward": _max_pool2d_backward_fake,
    "avg_pool2d": _avg_pool2d_fake,
    "avg_pool2d_backward": _avg_pool2d_backward_fake,
    "adaptive_avg_pool2d": _adaptive_avg_pool2d_fake,
    "adaptive_avg_pool2d_backward": _adaptive_avg_pool2d_backward_fake,
}


# Autograd: every forward op's gradient is its backend's backward op. The argmax output and the
# integer arguments have no gradient.


def _save_geometry(ctx, inputs, output):
    input, *geometry = inputs
    ctx.input_size = tuple(input.shape[-2:])
    ctx.geometry = geometry
    ctx.channels_last = is_channels_last(input)


def _save_max_pool2d(ctx, inputs, output):
    _save_geometry(ctx, inputs, output)
    ctx.save_for_backward(output[1])


def _register_autograd(backend: str) -> None:
    max_backward = backend_op("max_pool2d_backward", backend)
    avg_backward = backend_op("avg_pool2d_backward", backend)
    adaptive_backward = backend_op("adaptive_avg_pool2d_backward", backend)

    def max_pool2d_backward(ctx, grad_output, _grad_argmax):
        kernel_size, stride, padding, dilation, _ = ctx.geometry
        grad_input = max_backward(
            grad_output, ctx.saved_tensors[0], ctx.input_size, kernel_size, stride, padding, dilation, ctx.channels_last
        )
        return grad_input, None, None, None, None, None

    def avg_pool2d_backward(ctx, grad_output):
        kernel_size, stride, padding, _, count_include_pad, divisor_override = ctx.geometry
        grad_input = avg_backward(
            grad_output, ctx.input_size, kernel_size, stride, padding, count_include_pad, divisor_override, ctx.channels_last
        )
        return grad_input, None, None, None, None, None, None

    def adaptive_avg_pool2d_backward(ctx, grad_output):
        return adaptive_backward(grad_output, ctx.input_size, ctx.channels_last), None

    for name, backward, setup_context in (
        ("max_pool2d", max_pool2d_backward, _save_max_pool2d),
        ("avg_pool2d", avg_pool2d_backward, _save_geometry),
        ("adaptive_avg_pool2d", adaptive_avg_pool2d_backward, _save_geometry),
    ):
        torch.library.register_autograd(f"vkernels::{name}_{backend}", backward, setup_context=setup_context)


define_backend_ops(SCHEMAS, _FAKES, TRITON_LAUNCHERS)
for _backend in dispatch.KERNEL_BACKENDS:
    _register_autograd(_backend)


# Public functions: torch.nn.functional's signatures plus ``backend``.


def _choose(op: str, input: torch.Tensor, backend: str | None) -> str:
    return dispatch.choose(backend, input.device, input.dtype, DTYPES, op=op)


def _batched(input: torch.Tensor) -> torch.Tensor:
    """4-D view of a 3-D (unbatched) input, as torch pools it."""
    return input if input.dim() == 4 else input.unsqueeze(0)


def _unbatched_like(input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return output if input.dim() == 4 else output.squeeze(0)


def _window_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, name):
    check_pool_input(input, name)
    kernel_size = pair(kernel_size, f"{name}: kernel_size")
    stride = pool_stride(stride, kernel_size, f"{name}: stride")
    padding = pair(padding, f"{name}: padding")
    dilation = pair(dilation, f"{name}: dilation")
    output_size = pool2d_output_size(input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    return kernel_size, stride, padding, dilation, output_size


def _window_positions_to_indices(argmax, input_size, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """torch's max-pool indices (flat ``h * W + w`` in the input plane) from positions in the window."""
    out_h, out_w = argmax.shape[-2:]
    positions = argmax.long()
    rows = torch.arange(out_h, device=argmax.device).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=argmax.device) * stride[1] - padding[1]
    input_rows = rows + positions.div(kernel_size[1], rounding_mode="floor") * dilation[0]
    input_cols = cols + positions.remainder(kernel_size[1]) * dilation[1]
    indices = input_rows * input_size[1] + input_cols
    return indices.contiguous(memory_format=memory_format(is_channels_last(argmax)))


def max_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    backend: str | None = None,
):
    """``torch.nn.functional.max_pool2d`` (ties pick the first maximum in the window, NaN propagates)."""
    chosen = _choose("max_pool2d", input, backend)
    if chosen == "torch":
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices)
    geometry = _window_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")
    output, argmax = backend_op("max_pool2d", chosen)(_batched(input), *geometry)
    if not return_indices:
        return _unbatched_like(input, output)
    indices = _window_positions_to_indices(argmax, input.shape[-2:], *geometry[:4])
    return _unbatched_like(input, output), _unbatched_like(input, indices)


def avg_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.avg_pool2d``."""
    chosen = _choose("avg_pool2d", input, backend)
    if chosen == "torch":
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("avg_pool2d: divisor must be not zero")
    kernel_size, stride, padding, _, output_size = _window_geometry(
        input, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d"
    )
    output = backend_op("avg_pool2d", chosen)(
        _batched(input), kernel_size, stride, padding, output_size, count_include_pad, divisor_override
    )
    return _unbatched_like(input, output)


def adaptive_avg_pool2d(input: torch.Tensor, output_size, *, backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.adaptive_avg_pool2d`` (windows ``[floor(i*H/OH), ceil((i+1)*H/OH))``)."""
    chosen = _choose("adaptive_avg_pool2d", input, backend)
    if chosen == "torch":
        return F.adaptive_avg_pool2d(input, output_size)
    check_pool_input(input, "adaptive_avg_pool2d")
    output = backend_op("adaptive_avg_pool2d", chosen)(_batched(input), adaptive_output_size(input.shape, output_size))
    return _unbatched_like(input, output)
