"""Fused conv2d + bias (+ residual) + activation, forward and backward.

Each kernel backend has the ops ``vkernels::conv2d_<backend>`` / ``conv2d_backward_<backend>`` (any
activation of ``ACTIVATIONS``, or none), ``conv2d_relu_<backend>`` / ``conv2d_relu_backward_<backend>``
(ReLU) and ``conv2d_relu_maxpool2d_<backend>``, with one schema each written here. The Triton ops are
implemented by ``vkernels.triton_kernels.conv``, the CUDA ops by ``csrc/cuda/conv.cu``; ReLU runs
through the conv2d_relu ops, whose backward takes the mask from the output.

Bias, residual and activation live in the kernel's epilogue. What the backward needs for the
activation's derivative (``_saves_pre_activation``): for relu, relu6 and leaky_relu with a slope >= 0
the output gives it, so nothing beyond the output (which autograd keeps anyway, usually as the next
layer's saved input) is saved: 0 extra bytes per element; hardswish, silu, gelu, gelu_tanh and
leaky_relu with a negative slope need the pre-activation, which the forward writes beside the output
when a gradient will be needed: one more element of the input's dtype per output element (2 bytes
in fp16/bf16, 4 in fp32), as eager PyTorch's separate activation saves its input. Without an
activation the backward needs neither. (Transient, not saved: for activations other than ReLU the CUDA
backward writes grad_out through the derivative once, one element per output element, which its GEMMs
read; Triton's writes it only when two of its kernels would otherwise both compute it.) ``conv2d_relu_maxpool2d_<backend>`` adds a max-pool epilogue
(in both backends) and saves only the window positions of the maxima (1 byte for windows of up to
128 positions); its backward recomputes the activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vkernels import dispatch
from vkernels.ops import pooling  # noqa: F401  defines the max_pool2d_backward ops the fused pool's backward calls
from vkernels.ops.library import autocast_inputs, backend_op, define_backend_ops
from vkernels.shapes import (
    conv2d_geometry,
    conv_shape_class,
    is_channels_last,
    memory_format,
    pair,
    pool2d_output_size,
    pool_stride as pool_stride_rule,  # the public function's argument is called pool_stride
    window_index_dtype,
)
from vkernels.triton_kernels import conv as triton_conv

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# activation name -> torch's function of (pre-activation, negative_slope): what the kernels match, the
# torch backend's epilogue, and the tests' reference
ACTIVATIONS = {
    "relu": lambda x, negative_slope: F.relu(x),
    "relu6": lambda x, negative_slope: F.relu6(x),
    "leaky_relu": lambda x, negative_slope: F.leaky_relu(x, negative_slope),
    "hardswish": lambda x, negative_slope: F.hardswish(x),
    "silu": lambda x, negative_slope: F.silu(x),
    "gelu": lambda x, negative_slope: F.gelu(x),
    "gelu_tanh": lambda x, negative_slope: F.gelu(x, approximate="tanh"),
}

SCHEMAS = {
    # activation: "none" or a key of ACTIVATIONS. Returns (out, pre-activation if save_pre_activation);
    # the backend decides nothing about saving, the autograd below does.
    "conv2d": "(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, int[2] output_size, str activation, float negative_slope, "
    "bool save_pre_activation) -> (Tensor, Tensor?)",
    # saved = the output or the pre-activation, per _saves_pre_activation (None without an activation)
    "conv2d_backward": "(Tensor grad_output, Tensor? saved, Tensor input, Tensor weight, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, bool[4] needs, bool channels_last, str activation, "
    "float negative_slope) -> (Tensor?, Tensor?, Tensor?, Tensor?)",
    "conv2d_relu": "(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, int[2] output_size) -> Tensor",
    # needs = which of (input, weight, bias, residual) want a gradient; the others come back None.
    # channels_last = the forward's memory format, for grad_input and grad_residual
    "conv2d_relu_backward": "(Tensor grad_output, Tensor output, Tensor input, Tensor weight, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, bool[4] needs, bool channels_last) -> (Tensor?, Tensor?, Tensor?, Tensor?)",
    # max_pool2d(relu(conv2d(...))) and each maximum's position in its pool window (the max_pool2d
    # ops' argmax); the activation is never written
    "conv2d_relu_maxpool2d": "(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, int[2] conv_output_size, int[2] pool_kernel_size, int[2] pool_stride, "
    "int[2] pool_padding, int[2] output_size) -> (Tensor, Tensor)",
}
TRITON_LAUNCHERS = {
    "conv2d": triton_conv.conv2d_forward,
    "conv2d_backward": triton_conv.conv2d_backward,
    "conv2d_relu": triton_conv.conv2d_relu_forward,
    "conv2d_relu_backward": triton_conv.conv2d_relu_backward,
    "conv2d_relu_maxpool2d": triton_conv.conv2d_relu_maxpool2d_forward,
}


def _conv2d_relu_fake(input, weight, bias, residual, stride, padding, dilation, groups, output_size):
    return torch.empty(
        (input.shape[0], weight.shape[0], *output_size),
        dtype=input.dtype,
        device=input.device,
        memory_format=memory_format(is_channels_last(input)),
    )


def _conv2d_fake(input, weight, bias, residual, stride, padding, dilation, groups, output_size, activation,
                 negative_slope, save_pre_activation):
    out = _conv2d_relu_fake(input, weight, bias, residual, stride, padding, dilation, groups, output_size)
    return out, torch.empty_like(out) if save_pre_activation else None


def _conv2d_backward_fake(grad_output, saved, input, weight, stride, padding, dilation, groups, needs, channels_last,
                          activation, negative_slope):
    need_input, need_weight, need_bias, need_residual = needs
    forward_format = memory_format(channels_last)
    return (
        torch.empty_like(input, memory_format=forward_format) if need_input else None,
        torch.empty_like(weight, memory_format=memory_format(is_channels_last(weight))) if need_weight else None,
        weight.new_empty(weight.shape[0]) if need_bias else None,
        torch.empty_like(grad_output, memory_format=forward_format) if need_residual else None,
    )


def _conv2d_relu_backward_fake(grad_output, output, input, weight, stride, padding, dilation, groups, needs,
                               channels_last):
    return _conv2d_backward_fake(grad_output, output, input, weight, stride, padding, dilation, groups, needs,
                                 channels_last, "relu", 0.0)


def _conv2d_relu_maxpool2d_fake(input, weight, bias, stride, padding, dilation, groups, conv_output_size,
                                pool_kernel_size, pool_stride, pool_padding, output_size):
    shape = (input.shape[0], weight.shape[0], *output_size)
    layout = memory_format(is_channels_last(input))
    argmax_dtype = window_index_dtype(pool_kernel_size[0] * pool_kernel_size[1])
    return (torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=layout),
            torch.empty(shape, dtype=argmax_dtype, device=input.device, memory_format=layout))


def _saves_pre_activation(activation: str | None, negative_slope: float) -> bool:
    """Whether the backward reads the activation's derivative from the pre-activation, which the forward
    must then write; otherwise the output gives it (relu, relu6, leaky_relu with slope >= 0: the sign
    and the [0, 6] band survive the activation) or there is no activation."""
    return activation in ("hardswish", "silu", "gelu", "gelu_tanh") or (activation == "leaky_relu" and negative_slope < 0)


def _save_for_backward(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(output, input, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.channels_last = is_channels_last(input)


def _save_conv2d_for_backward(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, groups, _, activation, negative_slope, _ = inputs
    out, pre = output
    if pre is not None:
        ctx.mark_non_differentiable(pre)
    saved = None
    if activation != "none":
        saved = pre if _saves_pre_activation(activation, negative_slope) else out
    ctx.save_for_backward(saved, input, weight)
    ctx.missing_pre_activation = activation != "none" and saved is None
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.activation = (activation, negative_slope)
    ctx.channels_last = is_channels_last(input)


def _save_for_maxpool_backward(ctx, inputs, output):
    input, weight, bias, *geometry, _ = inputs
    ctx.save_for_backward(input, weight, bias, output[1])
    ctx.geometry = geometry
    ctx.channels_last = is_channels_last(input)


def _register_autograd(backend: str) -> None:
    backward_op = backend_op("conv2d_relu_backward", backend)

    def backward(ctx, grad_output):
        output, input, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        grads = backward_op(grad_output, output, input, weight, *ctx.geometry, needs, ctx.channels_last)
        return *grads, None, None, None, None, None

    torch.library.register_autograd(f"vkernels::conv2d_relu_{backend}", backward, setup_context=_save_for_backward)

    conv2d_backward_op = backend_op("conv2d_backward", backend)

    def conv2d_backward(ctx, grad_output, _grad_pre_activation):
        if ctx.missing_pre_activation:
            raise RuntimeError(f"vkernels::conv2d_{backend}: activation {ctx.activation[0]!r} needs the pre-activation "
                               "for its backward; call the op with save_pre_activation=True when gradients are needed")
        saved, input, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        without_activation = ctx.activation[0] == "none"
        if without_activation:  # the residual's gradient is grad_output itself
            needs[3] = False
        grads = conv2d_backward_op(grad_output, saved, input, weight, *ctx.geometry, needs, ctx.channels_last,
                                   *ctx.activation)
        grad_residual = grad_output if without_activation and ctx.needs_input_grad[3] else grads[3]
        return *grads[:3], grad_residual, *([None] * 8)

    torch.library.register_autograd(f"vkernels::conv2d_{backend}", conv2d_backward,
                                    setup_context=_save_conv2d_for_backward)

    forward_op = backend_op("conv2d_relu", backend)
    max_pool_backward_op = backend_op("max_pool2d_backward", backend)

    def maxpool_backward(ctx, grad_output, _grad_argmax):
        # the activation was never saved: recompute it (compute traded for its memory), route the
        # gradient through the pool's window positions, then through the conv + ReLU backward
        input, weight, bias, argmax = ctx.saved_tensors
        stride, padding, dilation, groups, conv_output_size, pool_kernel_size, pool_stride, pool_padding = ctx.geometry
        activation = forward_op(input, weight, bias, None, stride, padding, dilation, groups, conv_output_size)
        grad_activation = max_pool_backward_op(grad_output, argmax, conv_output_size, pool_kernel_size, pool_stride,
                                               pool_padding, [1, 1], ctx.channels_last)
        needs = [*ctx.needs_input_grad[:3], False]
        grad_input, grad_weight, grad_bias, _ = backward_op(
            grad_activation, activation, input, weight, stride, padding, dilation, groups, needs, ctx.channels_last
        )
        return grad_input, grad_weight, grad_bias, *([None] * 9)

    torch.library.register_autograd(f"vkernels::conv2d_relu_maxpool2d_{backend}", maxpool_backward,
                                    setup_context=_save_for_maxpool_backward)


define_backend_ops(
    SCHEMAS,
    {
        "conv2d": _conv2d_fake,
        "conv2d_backward": _conv2d_backward_fake,
        "conv2d_relu": _conv2d_relu_fake,
        "conv2d_relu_backward": _conv2d_relu_backward_fake,
        "conv2d_relu_maxpool2d": _conv2d_relu_maxpool2d_fake,
    },
    TRITON_LAUNCHERS,
)
for _backend in dispatch.KERNEL_BACKENDS:
    _register_autograd(_backend)


def _check_one_dtype(name: str, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not input.dtype == weight.dtype == (input.dtype if bias is None else bias.dtype):
        raise RuntimeError(f"{name}: input, weight and bias must share a dtype, got {input.dtype}, {weight.dtype}"
                           f"{'' if bias is None else f' and {bias.dtype}'}")


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    negative_slope: float = 0.01,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)``.

    Takes every argument of ``F.conv2d`` (int or pair stride/padding/dilation, padding ``'same'`` and
    ``'valid'``, groups including depthwise), batched or unbatched input in NCHW, channels_last or
    any strides; the output keeps the input's memory format. ``residual``, if given, has the output's
    shape and is added before the activation. ``activation`` is None or one of ``"relu"``,
    ``"relu6"``, ``"leaky_relu"`` (with ``negative_slope``, as ``F.leaky_relu``), ``"hardswish"``,
    ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` (``F.gelu(approximate="tanh")``), computed as torch computes
    them. Depthwise convs (groups == in == out channels) run direct kernels, the others implicit GEMMs.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"conv2d: unknown activation {activation!r}; expected None or one of {list(ACTIVATIONS)}")
    stride_hw, padding_hw, dilation_hw, output_size = conv2d_geometry(
        input.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation, groups
    )
    output_shape = (*input.shape[:-3], weight.shape[0], *output_size)
    if residual is not None and tuple(residual.shape) != output_shape:
        raise RuntimeError(f"conv2d: residual of shape {tuple(residual.shape)} does not match the output {output_shape}")
    operands = autocast_inputs(input.device.type, input, weight, bias, residual)
    # ReLU runs on the conv2d_relu ops, the conv2d ops serve every other activation
    family = "conv2d_relu" if activation == "relu" else "conv2d"
    chosen = dispatch.choose(backend, input.device, operands[0].dtype, DTYPES, op=family,
                             shape_class=conv_shape_class(weight.shape[-2:], groups, input.shape[-3]))
    if chosen == "torch":  # stock autocast semantics: conv in low precision, the add promotes
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        out = out if residual is None else out + residual
        return out if activation is None else ACTIVATIONS[activation](out, negative_slope)
    input, weight, bias, residual = operands
    _check_one_dtype(family, input, weight, bias)
    batched = input.dim() == 4
    arguments = (
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
    if family == "conv2d_relu":
        out = backend_op(family, chosen)(*arguments)
    else:
        grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)
        save_pre_activation = grad_needed and _saves_pre_activation(activation, negative_slope)
        out, _ = backend_op(family, chosen)(*arguments, activation or "none", float(negative_slope), save_pre_activation)
    return out if batched else out.squeeze(0)


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
    """``relu(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)``:
    :func:`conv2d` with ``activation="relu"``."""
    return conv2d(input, weight, bias, stride, padding, dilation, groups, activation="relu", residual=residual,
                  backend=backend)


def conv2d_relu_maxpool2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    pool_kernel_size,
    pool_stride=None,
    pool_padding=0,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.max_pool2d(relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)),
    pool_kernel_size, pool_stride, pool_padding)``: the CNN block conv -> ReLU -> pool in one kernel.

    The conv takes every argument of ``F.conv2d``; the pool takes max_pool2d's kernel size, stride
    (default: the kernel size) and padding (at most half the kernel), with no dilation or ceil_mode.
    The Triton and CUDA kernels never write the activation; the backward recomputes it from the inputs
    and the saved window positions of the maxima (1 byte each for windows of up to 128 positions). The
    output keeps the input's memory format.
    """
    stride_hw, padding_hw, dilation_hw, conv_output_size = conv2d_geometry(
        input.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation, groups
    )
    pool_kernel_size = pair(pool_kernel_size, "conv2d_relu_maxpool2d: pool_kernel_size")
    pool_stride = pool_stride_rule(pool_stride, pool_kernel_size, "conv2d_relu_maxpool2d: pool_stride")
    pool_padding = pair(pool_padding, "conv2d_relu_maxpool2d: pool_padding")
    output_size = pool2d_output_size(
        (*input.shape[:-3], weight.shape[0], *conv_output_size), pool_kernel_size, pool_stride, pool_padding, (1, 1), False
    )
    operands = autocast_inputs(input.device.type, input, weight, bias)
    chosen = dispatch.choose(backend, input.device, operands[0].dtype, DTYPES, op="conv2d_relu_maxpool2d",
                             shape_class=conv_shape_class(weight.shape[-2:], groups, input.shape[-3]))
    if chosen == "torch":
        return F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)),
                            pool_kernel_size, pool_stride, pool_padding)
    input, weight, bias = operands
    _check_one_dtype("conv2d_relu_maxpool2d", input, weight, bias)
    batched = input.dim() == 4
    out, _ = backend_op("conv2d_relu_maxpool2d", chosen)(
        input if batched else input.unsqueeze(0),
        weight,
        bias,
        stride_hw,
        padding_hw,
        dilation_hw,
        groups,
        conv_output_size,
        pool_kernel_size,
        pool_stride,
        pool_padding,
        output_size,
    )
    return out if batched else out.squeeze(0)
