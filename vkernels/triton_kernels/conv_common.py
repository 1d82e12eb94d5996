"""What every conv kernel shares: the activations and their derivatives, the epilogue (bias, residual,
activation), the gradient load, and the output pixels of a weight-gradient kernel's slice.

Activations are computed in fp32 with torch's formulas (aten's CUDA/CPU kernels), so that the fused
result is ``act(conv + bias + residual)`` as torch computes it, rounded once to the output dtype.
Kernels take the activation as a constexpr code (``ACTIVATION_CODES``); ``negative_slope`` is a
run-time argument read by leaky_relu only.

Derivatives are written in terms of one saved value ``v``: for relu, relu6 and leaky_relu (slope >= 0)
the output gives the same derivative as the pre-activation (the sign and the [0, 6] band survive the
activation), so the op saves the output there; hardswish, silu, gelu, gelu_tanh and leaky_relu with a
negative slope need the pre-activation itself (vkernels.ops.conv decides which to save).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu", "hardswish", "silu", "gelu", "gelu_tanh")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}

# Constants multiply tensors from the right: the interpreter's constexpr * tensor stays a constexpr.
NONE = tl.constexpr(0)
RELU = tl.constexpr(1)
RELU6 = tl.constexpr(2)
LEAKY_RELU = tl.constexpr(3)
HARDSWISH = tl.constexpr(4)
SILU = tl.constexpr(5)
GELU = tl.constexpr(6)
GELU_TANH = tl.constexpr(7)

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): saturates to +-1 without inf/inf; Triton has no portable tanh across versions
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr, negative_slope):
    """act(x) for fp32 x. relu, relu6 and leaky_relu keep NaN, as torch's do."""
    if ACTIVATION == RELU:
        x = tl.where(x < 0, 0.0, x)
    elif ACTIVATION == RELU6:
        x = tl.where(x < 0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif ACTIVATION == LEAKY_RELU:
        x = tl.where(x > 0, x, x * negative_slope)
    elif ACTIVATION == HARDSWISH:
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif ACTIVATION == SILU:
        x = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == GELU:
        x = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    elif ACTIVATION == GELU_TANH:
        x = 0.5 * x * (1.0 + _tanh((x + x * x * x * GELU_TANH_CUBIC) * SQRT_2_OVER_PI))
    return x


@triton.jit
def activation_grad(grad, saved, ACTIVATION: tl.constexpr, negative_slope):
    """d act / d pre-activation times grad, in fp32 from fp32 ``grad`` and the saved value (the output
    or the pre-activation, see the module docstring), as torch's *_backward kernels compute it."""
    if ACTIVATION == RELU:
        grad = tl.where(saved > 0, grad, 0.0)
    elif ACTIVATION == RELU6:
        grad = tl.where((saved > 0) & (saved < 6.0), grad, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        grad = tl.where(saved > 0, grad, grad * negative_slope)
    elif ACTIVATION == HARDSWISH:
        # the open interval (-3, 3), as torch's CPU and current CUDA hardswish_backward take it
        grad = tl.where(saved <= -3.0, 0.0, tl.where(saved < 3.0, grad * (saved / 3.0 + 0.5), grad))
    elif ACTIVATION == SILU:
        sigmoid = 1.0 / (1.0 + tl.exp(-saved))
        grad = grad * sigmoid * (1.0 + saved * (1.0 - sigmoid))
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(saved * SQRT_HALF))
        pdf = tl.exp(-0.5 * saved * saved) * INV_SQRT_2PI
        grad = grad * (cdf + saved * pdf)
    elif ACTIVATION == GELU_TANH:
        inner_tanh = _tanh((saved + saved * saved * saved * GELU_TANH_CUBIC) * SQRT_2_OVER_PI)
        inner_slope = (1.0 + saved * saved * (3.0 * GELU_TANH_CUBIC)) * SQRT_2_OVER_PI
        grad = grad * (0.5 * (1.0 + inner_tanh) + 0.5 * saved * (1.0 - inner_tanh * inner_tanh) * inner_slope)
    return grad


@triton.jit
def load_grad(grad_ptr, saved_ptr, offsets, valid, GRAD_ACTIVATION: tl.constexpr, negative_slope):
    """The gradient w.r.t. the pre-activation at ``offsets``, in the gradient's dtype (zero where not
    valid): grad_out through the activation's derivative, read from the saved tensor as it loads.
    grad_out and the saved tensor are NHWC-dense tensors of one shape, so one offset addresses both.
    GRAD_ACTIVATION == NONE loads the gradient as it is."""
    grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0)
    if GRAD_ACTIVATION != NONE:
        saved = tl.load(saved_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        grad = activation_grad(grad.to(tl.float32), saved, GRAD_ACTIVATION, negative_slope).to(grad.dtype)
    return grad


@triton.jit
def conv_epilogue(acc, bias_ptr, channel, channel_ok, residual_ptr, pre_ptr, out_offsets, out_ok, negative_slope,
                  HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr,
                  ACTIVATION: tl.constexpr):
    """act(acc + bias + residual) in fp32; with STORE_PRE the pre-activation is also stored (rounded to
    pre's dtype) for a backward whose derivative needs it. The residual and pre are NHWC-dense like
    the output: ``out_offsets`` addresses all three."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + out_offsets, mask=out_ok, other=0.0).to(tl.float32)
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=out_ok)
    return apply_activation(acc, ACTIVATION, negative_slope)


@triton.jit
def split_blocks(split, num_splits, m_total, BLOCK_M: tl.constexpr):
    """[first, last) of the BLOCK_M-pixel blocks that reduction slice ``split`` of ``num_splits`` sums:
    fixed contiguous ranges, so the slices' partial sums add up in the same order every run."""
    m_blocks = tl.cdiv(m_total, BLOCK_M)
    blocks_per_split = tl.cdiv(m_blocks, num_splits)
    first_block = split * blocks_per_split
    return first_block, tl.minimum(first_block + blocks_per_split, m_blocks)


@triton.jit
def output_pixels(block, m_total, OH, OW, BLOCK_M: tl.constexpr):
    """(valid, image, row, column) of the output pixels of pixel block ``block`` (flat N*OH*OW order)."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_m < m_total, (offs_m // (OH * OW)).to(tl.int64), (offs_m % (OH * OW)) // OW, offs_m % OW
