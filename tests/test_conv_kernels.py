"""The conv2d + bias + residual + ReLU kernels of each backend called directly (ops
vkernels::conv2d_relu[_backward]_<backend>, no autograd), against a float64 reference.

Reference: relu(F.conv2d(...) + residual) in float64 and its autograd gradients. Geometries cover 1x1
(the pure-GEMM path, and stride 2), 3x3, the 7x7/2 stem, rectangular kernels, strides and dilations
that leave some taps without a stride phase, torch's asymmetric padding='same' for even kernels,
groups, depthwise and depthwise-multiplier convs, both K orders (channels per group a multiple of 16
or not), inputs NCHW, channels_last or strided views. Without a GPU the Triton kernels run in the
interpreter (tests/conftest.py sets TRITON_INTERPRET), so tensors stay tiny, and the CUDA kernels in
the emulator, in every dtype; CUDA_GEOMETRIES add their 16-byte cp.async gathers (channels per group
a multiple of 8) with several M, N and K tiles, and weight and bias gradients split into slices.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from support import GPU, KERNEL_BACKENDS, device_for, dtypes_for, layout, poison_allocator, relative_error, tolerance
from vkernels import shapes
from vkernels.ops.library import backend_op
from vkernels.triton_kernels import conv

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


GEOMETRIES = {
    "1x1": Geometry(2, 16, 20, (5, 7), (1, 1), input_layout="channels_last", weight_layout="channels_last"),
    "1x1_stride2": Geometry(2, 8, 8, (7, 9), (1, 1), stride=(2, 2), bias=False, cpu_dtype=torch.float16),
    "3x3": Geometry(2, 5, 6, (7, 9), (3, 3), padding=(1, 1), input_layout="strided", weight_layout="strided"),
    "3x3_stride2_16_channel_blocks": Geometry(1, 32, 16, (7, 5), (3, 3), stride=(2, 2), padding=(1, 1), residual=False,
                                              input_layout="channels_last", cpu_dtype=torch.float16),
    "7x7_stride2_stem": Geometry(1, 3, 8, (9, 9), (7, 7), stride=(2, 2), padding=(3, 3), residual=False,
                                 input_layout="channels_last", weight_layout="channels_last", cpu_dtype=torch.float16),
    "3x5_rectangular": Geometry(2, 4, 6, (8, 7), (3, 5), stride=(2, 1), padding=(1, 2)),
    "dilation2": Geometry(1, 6, 4, (9, 9), (3, 3), padding=(2, 2), dilation=(2, 2), input_layout="channels_last"),
    "stride3x2_dilation2x3": Geometry(1, 4, 6, (9, 9), (3, 3), stride=(3, 2), padding=(1, 2), dilation=(2, 3),
                                      cpu_dtype=torch.float16),
    "same_even_kernel": Geometry(1, 4, 6, (7, 6), (4, 2), padding="same", dilation=(1, 2), input_layout="strided"),
    "groups2": Geometry(2, 8, 6, (7, 7), (3, 3), stride=(2, 2), padding=(1, 1), groups=2,
                        input_layout="channels_last", cpu_dtype=torch.float16),
    "depthwise": Geometry(2, 8, 8, (7, 9), (3, 3), padding=(1, 1), groups=8,
                          input_layout="channels_last", weight_layout="channels_last"),
    "depthwise_stride2_dilation2": Geometry(1, 6, 6, (9, 9), (3, 3), stride=(2, 2), padding=(2, 2), dilation=(2, 2),
                                            groups=6, bias=False, residual=False, cpu_dtype=torch.float16),
    "depthwise_multiplier2": Geometry(1, 4, 8, (7, 7), (3, 3), padding=(1, 1), groups=4, residual=False),
    "odd_2x3_unpadded": Geometry(3, 3, 5, (5, 3), (2, 3), input_layout="strided", cpu_dtype=torch.float16),
}

# The CUDA kernels' 128 x 64 x 32 tensor-core tiles (fp32: 64 x 64 x 16) and their slices.
CUDA_GEOMETRIES = {
    "16_byte_gathers_3x2x9_tiles": Geometry(2, 32, 72, (12, 11), (3, 3), padding=(1, 1),
                                            input_layout="channels_last", weight_layout="channels_last"),
    "16_byte_gathers_groups_stride2": Geometry(2, 32, 32, (9, 10), (3, 3), stride=(2, 2), padding=(1, 1), groups=2,
                                               input_layout="channels_last"),
    "16_byte_gathers_stride2_dilation2": Geometry(1, 16, 24, (11, 9), (3, 3), stride=(2, 2), padding=(2, 2),
                                                  dilation=(2, 2), residual=False, input_layout="channels_last"),
    "nchw_element_gathers": Geometry(2, 12, 20, (8, 8), (3, 3), padding=(1, 1)),
    "weight_and_bias_gradient_slices": Geometry(2, 8, 8, (64, 64), (1, 1), input_layout="channels_last"),
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
        bias=rng.random() < 0.5, residual=rng.random() < 0.5,
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


def check_conv2d_relu(backend: str, g: Geometry, dtype: torch.dtype, needs=ALL_GRADS):
    device = device_for(backend)
    x, w, b = make_operands(g, dtype, device)
    leaves = [x.double(), w.double(), None if b is None else b.double()]
    for leaf in leaves:
        if leaf is not None:
            leaf.requires_grad_()
    pre = F.conv2d(leaves[0], leaves[1], leaves[2], g.stride, g.padding, g.dilation, g.groups)
    r = layout(torch.randn(pre.shape, device=device).to(dtype), "strided") if g.residual else None
    leaves.append(None if r is None else r.double().requires_grad_())
    expected = torch.relu(pre if r is None else pre + leaves[3])

    poison_allocator(device)
    out = backend_op("conv2d_relu", backend)(x, w, b, r, g.stride, launcher_padding(g), g.dilation, g.groups,
                                             tuple(expected.shape[2:]))
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=shapes.memory_format(shapes.is_channels_last(x)))
    assert relative_error(out, expected) < kernel_tolerance(backend, dtype)

    grad_out = torch.randn(out.shape, device=device).to(dtype)
    expected.backward(grad_out.double())
    # gradients are asked for only where the operand exists
    needs = tuple(need and leaf is not None for need, leaf in zip(needs, leaves))
    poison_allocator(device)
    grads = backend_op("conv2d_relu_backward", backend)(grad_out, out, x, w, g.stride, launcher_padding(g), g.dilation,
                                                        g.groups, needs, shapes.is_channels_last(x))
    for name, need, grad, leaf in zip(("input", "weight", "bias", "residual"), needs, grads, leaves):
        if not need:
            assert grad is None, name
            continue
        assert grad.shape == leaf.shape and grad.dtype == dtype, name
        assert relative_error(grad, leaf.grad) < kernel_tolerance(backend, dtype), name
    return grads


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("backend, geometry, dtype", geometry_dtypes(GEOMETRIES))
def test_conv2d_relu_matches_float64_reference(backend, geometry, dtype):
    check_conv2d_relu(backend, geometry, dtype)


@pytest.mark.parametrize("backend, geometry, dtype", geometry_dtypes(CUDA_GEOMETRIES, backends=("cuda",)))
def test_cuda_kernel_tiles_match_float64_reference(backend, geometry, dtype):
    check_conv2d_relu(backend, geometry, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("draw", range(2))
def test_conv2d_relu_random_geometry(backend, seed, draw):
    geometry = random_geometry(random.Random(seed))
    check_conv2d_relu(backend, geometry, geometry.cpu_dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, False, True, False), (False, True, False, True)],
    ids=["input_only", "bias_only", "weight_and_residual"],
)
def test_conv2d_relu_backward_computes_only_what_is_needed(backend, needs):
    # input_only: the input-gradient kernel masks grad_out itself; bias_only: the reduction kernel
    # without its GEMM; weight_and_residual: the masked grad_out written while the weight reduces
    check_conv2d_relu(backend, GEOMETRIES["3x5_rectangular"], torch.float32, needs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv2d_relu_backward_is_deterministic(backend):
    g = GEOMETRIES["groups2"]
    x, w, _ = make_operands(g, torch.float32, device_for(backend))
    out = backend_op("conv2d_relu", backend)(x, w, None, None, g.stride, g.padding, g.dilation, g.groups, (4, 4))
    grad_out = torch.randn_like(out)
    first, second = (
        backend_op("conv2d_relu_backward", backend)(grad_out, out, x, w, g.stride, g.padding, g.dilation, g.groups,
                                                    ALL_GRADS, False)
        for _ in range(2)
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv2d_relu_empty_batch(backend):
    device = device_for(backend)
    x = torch.randn(0, 4, 5, 5, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    out = backend_op("conv2d_relu", backend)(x, w, None, None, (1, 1), (1, 1), (1, 1), 1, (5, 5))
    assert out.shape == (0, 6, 5, 5)
    grad_input, grad_weight, grad_bias, _ = backend_op("conv2d_relu_backward", backend)(
        out, out, x, w, (1, 1), (1, 1), (1, 1), 1, (True, True, True, False), False)
    assert grad_input.shape == x.shape
    assert torch.equal(grad_weight, torch.zeros_like(w)) and torch.equal(grad_bias, torch.zeros(6, device=device))
