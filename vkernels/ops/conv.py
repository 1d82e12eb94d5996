"""Fused conv2d + bias (+ residual) + ReLU, forward and backward, as implicit GEMMs.

Each kernel backend has the ops ``vkernels::conv2d_relu_<backend>`` and
``vkernels::conv2d_relu_backward_<backend>`` with one schema written here; the Triton ops are
implemented here by ``vkernels.triton_kernels.conv``. Bias, residual and ReLU live in the GEMM's
epilogue, so the pre-activation is never written; the backward saves only the output and recovers
the ReLU mask from ``output > 0`` inside its own loads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vkernels import dispatch
from vkernels.ops.library import autocast_inputs, backend_op, define_backend_ops
from vkernels.shapes import conv2d_geometry, is_channels_last, memory_format
from vkernels.triton_kernels import conv as triton_conv

FAMILY = "conv"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

SCHEMAS = {
    "conv2d_relu": "(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, int[2] output_size) -> Tensor",
    # needs = which of (input, weight, bias, residual) want a gradient; the others come back None.
    # channels_last = the forward's memory format, for grad_input and grad_residual
    "conv2d_relu_backward": "(Tensor grad_output, Tensor output, Tensor input, Tensor weight, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, bool[4] needs, bool channels_last) -> (Tensor?, Tensor?, Tensor?, Tensor?)",
}
TRITON_LAUNCHERS = {
    "conv2d_relu": triton_conv.conv2d_relu_forward,
    "conv2d_relu_backward": triton_conv.conv2d_relu_backward,
}


def _conv2d_relu_fake(input, weight, bias, residual, stride, padding, dilation, groups, output_size):
    return torch.empty(
        (input.shape[0], weight.shape[0], *output_size),
        dtype=input.dtype,
        device=input.device,
        memory_format=memory_format(is_channels_last(input)),
    )


def _conv2d_relu_backward_fake(grad_output, output, input, weight, stride, padding, dilation, groups, needs, channels_last):
    need_input, need_weight, need_bias, need_residual = needs
    forward_format = memory_format(channels_last)
    return (
        torch.empty_like(input, memory_format=forward_format) if need_input else None,
        torch.empty_like(weight, memory_format=memory_format(is_channels_last(weight))) if need_weight else None,
        weight.new_empty(weight.shape[0]) if need_bias else None,
        torch.empty_like(output, memory_format=forward_format) if need_residual else None,
    )


def _save_for_backward(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(output, input, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.channels_last = is_channels_last(input)


def _register_autograd(backend: str) -> None:
    backward_op = backend_op("conv2d_relu_backward", backend)

    def backward(ctx, grad_output):
        output, input, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        grads = backward_op(grad_output, output, input, weight, *ctx.geometry, needs, ctx.channels_last)
        return *grads, None, None, None, None, None

    torch.library.register_autograd(f"vkernels::conv2d_relu_{backend}", backward, setup_context=_save_for_backward)


define_backend_ops(
    SCHEMAS, {"conv2d_relu": _conv2d_relu_fake, "conv2d_relu_backward": _conv2d_relu_backward_fake}, TRITON_LAUNCHERS
)
for _backend in dispatch.KERNEL_BACKENDS:
    _register_autograd(_backend)


def conv2d_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)``.

    Takes every argument of ``F.conv2d`` (int or pair stride/padding/dilation, padding ``'same'`` and
    ``'valid'``, groups including depthwise), batched or unbatched input in NCHW, channels_last or
    any strides; the output keeps the input's memory format. ``residual``, if given, has the output's
    shape and is added before the ReLU.
    """
    stride_hw, padding_hw, dilation_hw, output_size = conv2d_geometry(
        input.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation, groups
    )
    output_shape = (*input.shape[:-3], weight.shape[0], *output_size)
    if residual is not None and tuple(residual.shape) != output_shape:
        raise RuntimeError(f"conv2d_relu: residual of shape {tuple(residual.shape)} does not match the output {output_shape}")
    operands = autocast_inputs(input.device.type, input, weight, bias, residual)
    chosen = dispatch.choose(FAMILY, backend, input.device, operands[0].dtype, DTYPES, op="conv2d_relu")
    if chosen == "torch":  # stock autocast semantics: conv in low precision, the add promotes
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return F.relu(out if residual is None else out + residual)
    input, weight, bias, residual = operands
    if not input.dtype == weight.dtype == (input.dtype if bias is None else bias.dtype):
        raise RuntimeError(f"conv2d_relu: input, weight and bias must share a dtype, got {input.dtype}, {weight.dtype}"
                           f"{'' if bias is None else f' and {bias.dtype}'}")
    batched = input.dim() == 4
    out = backend_op("conv2d_relu", chosen)(
        input if batched else input.unsqueeze(0),
        weight,
        bias,
        residual if residual is None or batched else residual.unsqueeze(0),
        stride_hw,
        padding_hw,
        dilation_hw,
        groups,
        output_size,
    )
    return out if batched else out.squeeze(0)
