"""The conv2d + bias + residual + activation kernels of each backend called directly (ops
vkernels::conv2d[_backward]_<backend>, no autograd), against a float64 reference.

Reference: act(F.conv2d(...) + residual) in float64 and its autograd gradients. Geometries cover 1x1
(the pure-GEMM path, and stride 2), 3x3, the 7x7/2 stem, rectangular kernels, strides and dilations
that leave some taps without a stride phase, torch's asymmetric padding='same' for even kernels,
groups, depthwise convs on the direct kernels (3x3, MobileNet's 5x5/2, ConvNeXt's 7x7, dilated and
strided) and depthwise-multiplier convs, both K orders (channels per group a multiple of 16 or not),
inputs NCHW, channels_last or strided views; each geometry with one of the activations, so that every
activation meets both kernel families. Without a GPU the Triton kernels run in the interpreter
(tests/conftest.py sets TRITON_INTERPRET), so tensors stay tiny, and the CUDA kernels in the emulator,
in every dtype; CUDA_GEOMETRIES add their 16-byte cp.async gathers (channels per group a multiple of
8) with several M, N and K tiles, and weight and bias gradients split into slices (the depthwise
weight gradient's too).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from support import GPU, KERNEL_BACKENDS, device_for, dtypes_for, layout, poison_allocator, relative_error, tolerance
from test_conv import reference_activation
from vkernels import shapes
from vkernels.ops import conv as conv_ops
from vkernels.ops.library import backend_op
from vkernels.triton_kernels import conv, conv_common

ALL_GRADS = (True, True, True, True)


@dataclass(frozen=True)
class Geometry:
    batch: int
    in_channels: int
    out_channels: int
    size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    residual: bool = True
    input_layout: str = "contiguous"
    weight_layout: str = "contiguous"
    cpu_dtype: torch.dtype = torch.float32
    activation: str = "relu"
    negative_slope: float = 0.01


GEOMETRIES = {
    "1x1": Geometry(2, 16, 20, (5, 7), (1, 1), input_layout="channels_last", weight_layout="channels_last"),
    "1x1_stride2": Geometry(2, 8, 8, (7, 9), (1, 1), stride=(2, 2), bias=False, cpu_dtype=torch.float16,
                            activation="hardswish"),
    "3x3": Geometry(2, 5, 6, (7, 9), (3, 3), padding=(1, 1), input_layout="strided", weight_layout="strided"),
    "3x3_stride2_16_channel_blocks": Geometry(1, 32, 16, (7, 5), (3, 3), stride=(2, 2), padding=(1, 1), residual=False,
                                              input_layout="channels_last", cpu_dtype=torch.float16, activation="silu"),
    "7x7_stride2_stem": Geometry(1, 3, 8, (9, 9), (7, 7), stride=(2, 2), padding=(3, 3), residual=False,
                                 input_layout="channels_last", weight_layout="channels_last", cpu_dtype=torch.float16),
    "3x5_rectangular": Geometry(2, 4, 6, (8, 7), (3, 5), stride=(2, 1), padding=(1, 2)),
    "dilation2": Geometry(1, 6, 4, (9, 9), (3, 3), padding=(2, 2), dilation=(2, 2), input_layout="channels_last",
                          activation="gelu"),
    "stride3x2_dilation2x3": Geometry(1, 4, 6, (9, 9), (3, 3), stride=(3, 2), padding=(1, 2), dilation=(2, 3),
                                      cpu_dtype=torch.float16, activation="leaky_relu", negative_slope=-0.2),
    "same_even_kernel": Geometry(1, 4, 6, (7, 6), (4, 2), padding="same", dilation=(1, 2), input_layout="strided"),
    "groups2": Geometry(2, 8, 6, (7, 7), (3, 3), stride=(2, 2), padding=(1, 1), groups=2,
                        input_layout="channels_last", cpu_dtype=torch.float16, activation="relu6"),
    "depthwise": Geometry(2, 8, 8, (7, 9), (3, 3), padding=(1, 1), groups=8,
                          input_layout="channels_last", weight_layout="channels_last"),
    "depthwise_stride2_dilation2": Geometry(1, 6, 6, (9, 9), (3, 3), stride=(2, 2), padding=(2, 2), dilation=(2, 2),
                                            groups=6, bias=False, residual=False, cpu_dtype=torch.float16,
                                            activation="hardswish"),
    "depthwise_5x5_stride2": Geometry(2, 20, 20, (11, 10), (5, 5), stride=(2, 2), padding=(2, 2), groups=20,
                                      input_layout="channels_last", activation="silu"),
    "depthwise_7x7": Geometry(1, 5, 5, (9, 8), (7, 7), padding=(3, 3), groups=5, cpu_dtype=torch.float16,
                              activation="gelu_tanh"),
    "depthwise_3x1_stride1x3_no_activation": Geometry(2, 3, 3, (6, 10), (3, 1), stride=(1, 3), padding=(1, 0),
                                                      groups=3, input_layout="strided", activation="none"),
    "depthwise_multiplier2": Geometry(1, 4, 8, (7, 7), (3, 3), padding=(1, 1), groups=4, residual=False,
                                      activation="leaky_relu", negative_slope=0.2),
    "odd_2x3_unpadded": Geometry(3, 3, 5, (5, 3), (2, 3), input_layout="strided", cpu_dtype=torch.float16,
                                 activation="none"),
}

# The CUDA kernels' 128 x 64 x 32 tensor-core tiles (fp32: 64 x 64 x 16) and their slices.
CUDA_GEOMETRIES = {
    "16_byte_gathers_3x2x9_tiles": Geometry(2, 32, 72, (12, 11), (3, 3), padding=(1, 1),
                                            input_layout="channels_last", weight_layout="channels_last",
                                            activation="silu"),
    "16_byte_gathers_groups_stride2": Geometry(2, 32, 32, (9, 10), (3, 3), stride=(2, 2), padding=(1, 1), groups=2,
                                               input_layout="channels_last", activation="hardswish"),
    "16_byte_gathers_stride2_dilation2": Geometry(1, 16, 24, (11, 9), (3, 3), stride=(2, 2), padding=(2, 2),
                                                  dilation=(2, 2), residual=False, input_layout="channels_last"),
    "nchw_element_gathers": Geometry(2, 12, 20, (8, 8), (3, 3), padding=(1, 1), activation="gelu_tanh"),
    "weight_and_bias_gradient_slices": Geometry(2, 8, 8, (64, 64), (1, 1), input_layout="channels_last"),
    "depthwise_weight_and_bias_gradient_slices": Geometry(2, 8, 8, (64, 64), (3, 3), padding=(1, 1), groups=8,
                                                          input_layout="channels_last", activation="gelu"),
}


def random_geometry(rng: random.Random) -> Geometry:
    """A small geometry drawn from the case's seed: any kernel up to 4x4, stride 1..3, dilation 1..2."""
    kernel = (rng.randint(1, 4), rng.randint(1, 4))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    padding = (rng.randint(0, kernel[0] // 2), rng.randint(0, kernel[1] // 2))
    groups = rng.choice([1, 1, 2, 3])
    size = tuple(max(1, (k - 1) * d + 1 - 2 * p) + rng.randint(0, 4) for k, d, p in zip(kernel, dilation, padding))
    return Geometry(
        rng.randint(1, 2), groups * rng.randint(1, 3), groups * rng.randint(1, 3), size, kernel,
        stride=(rng.randint(1, 3), rng.randint(1, 3)), padding=padding, dilation=dilation, groups=groups,
        bias=rng.random() < 0.5, residual=rng.random() < 0.5, activation=rng.choice(conv_common.ACTIVATIONS),
        negative_slope=rng.choice([0.01, -0.3]),
        input_layout=rng.choice(["contiguous", "channels_last", "strided"]),
        cpu_dtype=rng.choice([torch.float32, torch.float16]),
    )


def geometry_dtypes(geometries: dict[str, Geometry], backends=("triton", "cuda")):
    """(backend, geometry, dtype) parameters: Triton in the geometry's own dtype on the CPU interpreter
    (time) and in every dtype on a GPU, the CUDA kernels in every dtype."""
    for backend in (p for p in KERNEL_BACKENDS if p.values[0] in backends):
        name = backend.values[0]
        for geometry_name, geometry in geometries.items():
            dtypes = dtypes_for(name) if name == "cuda" or GPU else (geometry.cpu_dtype,)
            for dtype in dtypes:
                yield pytest.param(name, geometry, dtype, marks=backend.marks,
                                   id=f"{backend.id}-{geometry_name}-{str(dtype).removeprefix('torch.')}")


def kernel_tolerance(backend: str, dtype: torch.dtype) -> float:
    # Triton's fp32 on tensor cores rounds operands to TF32 (10-bit mantissa), as cuDNN does by default
    tf32 = backend == "triton" and dtype == torch.float32 and conv._dot_precision(dtype) == "tf32"
    return 2e-3 if tf32 else tolerance(dtype)


def make_operands(g: Geometry, dtype: torch.dtype, device: torch.device):
    x = layout(torch.randn(g.batch, g.in_channels, *g.size, device=device).to(dtype), g.input_layout)
    w = torch.randn(g.out_channels, g.in_channels // g.groups, *g.kernel, device=device)
    w = layout((w / (w[0].numel() ** 0.5)).to(dtype), g.weight_layout)
    b = torch.randn(g.out_channels, device=device).to(dtype) if g.bias else None
    return x, w, b


def launcher_padding(g: Geometry) -> tuple[int, int]:
    """The op layer's padding for the launchers: (top, left); 'same' puts the odd extra at the bottom/right."""
    if g.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(g.kernel, g.dilation))
    return g.padding


def check_conv2d(backend: str, g: Geometry, dtype: torch.dtype, needs=ALL_GRADS):
    """The forward and backward ops against act(conv2d + residual) in float64, the derivative taken at
    the dtype-rounded pre-activation where the backward reads it (test_conv.reference_activation)."""
    device = device_for(backend)
    x, w, b = make_operands(g, dtype, device)
    leaves = [x.double(), w.double(), None if b is None else b.double()]
    for leaf in leaves:
        if leaf is not None:
            leaf.requires_grad_()
    pre = F.conv2d(leaves[0], leaves[1], leaves[2], g.stride, g.padding, g.dilation, g.groups)
    r = layout(torch.randn(pre.shape, device=device).to(dtype), "strided") if g.residual else None
    leaves.append(None if r is None else r.double().requires_grad_())
    pre = pre if r is None else pre + leaves[3]
    activation = None if g.activation == "none" else g.activation
    expected = reference_activation(pre, dtype, activation, g.negative_slope)

    saves_pre = conv_ops._saves_pre_activation(activation, g.negative_slope)
    poison_allocator(device)
    out, pre_out = backend_op("conv2d", backend)(x, w, b, r, g.stride, launcher_padding(g), g.dilation, g.groups,
                                                 tuple(expected.shape[2:]), g.activation, g.negative_slope, saves_pre)
    channels_last = shapes.is_channels_last(x)
    for result in (out, pre_out) if saves_pre else (out,):
        assert result.dtype == dtype and result.shape == expected.shape
        assert result.is_contiguous(memory_format=shapes.memory_format(channels_last))
    assert relative_error(out, expected) < kernel_tolerance(backend, dtype)
    if saves_pre:
        assert relative_error(pre_out, pre) < kernel_tolerance(backend, dtype)
    else:
        assert pre_out is None

    grad_out = torch.randn(out.shape, device=device).to(dtype)
    expected.backward(grad_out.double())
    # gradients are asked for only where the operand exists
    needs = tuple(need and leaf is not None for need, leaf in zip(needs, leaves))
    saved = None if activation is None else pre_out if saves_pre else out
    poison_allocator(device)
    grads = backend_op("conv2d_backward", backend)(grad_out, saved, x, w, g.stride, launcher_padding(g), g.dilation,
                                                   g.groups, needs, channels_last, g.activation, g.negative_slope)
    for name, need, grad, leaf in zip(("input", "weight", "bias", "residual"), needs, grads, leaves):
        if not need:
            assert grad is None, name
            continue
        assert grad.shape == leaf.shape and grad.dtype == dtype, name
        assert relative_error(grad, leaf.grad) < kernel_tolerance(backend, dtype), name
    return grads


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("backend, geometry, dtype", geometry_dtypes(GEOMETRIES))
def test_conv2d_matches_float64_reference(backend, geometry, dtype):
    check_conv2d(backend, geometry, dtype)


@pytest.mark.parametrize("backend, geometry, dtype", geometry_dtypes(CUDA_GEOMETRIES, backends=("cuda",)))
def test_cuda_kernel_tiles_match_float64_reference(backend, geometry, dtype):
    check_conv2d(backend, geometry, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("draw", range(2))
def test_conv2d_random_geometry(backend, seed, draw):
    geometry = random_geometry(random.Random(seed + draw))
    check_conv2d(backend, geometry, geometry.cpu_dtype)


NEEDS = {
    # the input-gradient kernel takes the activation's derivative as it loads grad_out
    "input_only": (True, False, False, False),
    # the reduction kernel without its GEMM
    "bias_only": (False, False, True, False),
    # grad_pre written while the weight reduces
    "weight_and_residual": (False, True, False, True),
    # grad_pre written by the weight-gradient kernel, read by the input-gradient kernel
    "input_and_weight": (True, True, False, False),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("geometry", ["3x5_rectangular", "depthwise_5x5_stride2"])
@pytest.mark.parametrize("needs", NEEDS.values(), ids=NEEDS.keys())
def test_conv2d_backward_computes_only_what_is_needed(backend, needs, geometry):
    """ReLU (from the output) on the implicit GEMM, silu (from the pre-activation) on the direct kernels."""
    check_conv2d(backend, GEOMETRIES[geometry], torch.float32, needs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("geometry", ["groups2", "depthwise_5x5_stride2"])
def test_conv2d_backward_is_deterministic(backend, geometry):
    """Split weight and bias reductions, summed in a fixed order: bit-identical gradients run to run."""
    g = GEOMETRIES[geometry]
    x, w, b = make_operands(g, torch.float32, device_for(backend))
    size = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, p, d, k, st in zip(g.size, g.padding, g.dilation, g.kernel, g.stride))
    out, pre = backend_op("conv2d", backend)(x, w, b, None, g.stride, g.padding, g.dilation, g.groups, size, "gelu",
                                             0.0, True)
    grad_out = torch.randn(out.shape, device=out.device)
    first, second = (
        backend_op("conv2d_backward", backend)(grad_out, pre, x, w, g.stride, g.padding, g.dilation, g.groups,
                                               ALL_GRADS, False, "gelu", 0.0)
        for _ in range(2)
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "depthwise"])
def test_conv2d_empty_batch(backend, groups):
    device = device_for(backend)
    x = torch.randn(0, 4, 5, 5, device=device)
    w = torch.randn(4, 4 // groups, 3, 3, device=device)
    out, pre = backend_op("conv2d", backend)(x, w, None, None, (1, 1), (1, 1), (1, 1), groups, (5, 5), "silu", 0.0,
                                             True)
    assert out.shape == pre.shape == (0, 4, 5, 5)
    grad_input, grad_weight, grad_bias, grad_residual = backend_op("conv2d_backward", backend)(
        out, pre, x, w, (1, 1), (1, 1), (1, 1), groups, ALL_GRADS, False, "silu", 0.0)
    assert grad_input.shape == x.shape and grad_residual.shape == out.shape
    assert torch.equal(grad_weight, torch.zeros_like(w)) and torch.equal(grad_bias, torch.zeros(4, device=device))
