"""The pooling kernels of each backend called directly (ops vkernels::<op>_<backend>, no autograd),
against torch.nn.functional in float64.

Random geometries (seeded by conftest's per-case `seed`): odd sizes, rectangular kernels 1..5,
strides 1..4 (larger than the kernel included), padding up to k // 2, dilation 1..3, ceil_mode,
count_include_pad, divisor_override; inputs NCHW, channels_last, sliced or permuted views; ties,
-inf and NaN for max-pool's selection rule. Without a GPU the Triton kernels run in the interpreter
(tests/conftest.py sets TRITON_INTERPRET), so tensors stay tiny, and the CUDA kernels in the emulator.
The CUDA kernels' own paths: 8 or 16 channels moved by one 16-byte access (channels_last, C a
multiple of 8), and groups of up to 32 lanes sharing an NCHW window of 16 elements or more.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl

from support import KERNEL_BACKENDS, backends_and_dtypes, device_for, tolerance
from vkernels import shapes
from vkernels.ops.library import backend_op
from vkernels.triton_kernels import pooling

LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted")
CASES = range(2)
WINDOW_KEYS = ("kernel_size", "stride", "padding", "dilation")


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values stored NCHW, channels_last, as a slice of a larger tensor, or with memory
    order (N, H, C, W)."""
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        n, c, h, w = values.shape
        larger = torch.zeros((n, c + 2, h + 1, 2 * w), dtype=values.dtype, device=values.device)
        larger[:, 1 : c + 1, 1:, ::2] = values
        return larger[:, 1 : c + 1, 1:, ::2]
    if layout == "permuted":
        return values.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    raise ValueError(layout)


def random_values(shape, dtype: torch.dtype, device: torch.device, special: bool = False) -> torch.Tensor:
    """Normal values, or (special) values from {-inf, -1, 0, 1, NaN}: many ties, all -inf windows, NaNs."""
    if special:
        choices = torch.tensor([float("-inf"), -1.0, 0.0, 1.0, float("nan")], device=device)
        return choices[torch.randint(0, 5, shape, device=device)].to(dtype)
    return torch.randn(shape, device=device).to(dtype)


def random_window(rng: random.Random, dilated: bool) -> dict:
    kernel = (rng.randint(1, 5), rng.randint(1, 5))
    return {
        "kernel_size": kernel,
        "stride": (rng.randint(1, 4), rng.randint(1, 4)),
        "padding": (rng.randint(0, kernel[0] // 2), rng.randint(0, kernel[1] // 2)),
        "dilation": (rng.randint(1, 3), rng.randint(1, 3)) if dilated else (1, 1),
    }


def random_shape(rng: random.Random, window: dict | None = None) -> tuple[int, int, int, int]:
    """N <= 2, C <= 5, H, W <= 13, each spatial size at least what one window needs."""
    smallest = (1, 1)
    if window is not None:
        axes = zip(window["kernel_size"], window["dilation"], window["padding"])
        smallest = tuple(max(1, (k - 1) * d + 1 - 2 * p) for k, d, p in axes)
    return (rng.randint(1, 2), rng.randint(1, 5), rng.randint(smallest[0], 13), rng.randint(smallest[1], 13))


def windows_touch_input(shape, window: dict, ceil_mode: bool) -> bool:
    """Whether every window holds an input element. Dilation can make a window step over a small
    input: torch then outputs -inf and its backward sends the gradient to an index outside the
    window (another element of the plane), a quirk a gather backward does not reproduce."""
    output_size = shapes.pool2d_output_size(shape, ceil_mode=ceil_mode, **window)
    return all(
        any(0 <= o * s - p + i * d < size for i in range(k))
        for size, out, k, s, p, d in zip(shape[2:], output_size, *(window[key] for key in WINDOW_KEYS))
        for o in range(out)
    )


def random_max_pool_case(rng: random.Random, dtype: torch.dtype, layout: str, device: torch.device,
                         special: bool = False):
    while True:
        window = random_window(rng, dilated=True)
        shape, ceil_mode = random_shape(rng, window), rng.random() < 0.5
        if windows_touch_input(shape, window, ceil_mode):
            return with_layout(random_values(shape, dtype, device, special), layout), window, ceil_mode


def check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, equal_nan: bool = False):
    """Every element within tolerance of the float64 reference, |actual - expected| <= tol * (1 + |expected|)
    (the rounding of the stored output); NaN only where the reference has it."""
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    expected = expected.to(actual.device, torch.float64)
    tol = tolerance(dtype)
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol, atol=tol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}"
    )


def check_memory_format(tensor: torch.Tensor, channels_last: bool, what: str):
    assert tensor.is_contiguous(memory_format=shapes.memory_format(channels_last)), f"{what}: wrong memory format"


def check_grad_input(grad_input, grad_output, ref, x_ref, channels_last: bool, what: str):
    """A kernel's grad_input against the float64 reference's gradient of the same grad_output."""
    ref.backward(grad_output.double())
    check_close(grad_input, x_ref.grad, grad_output.dtype, what + " grad_input")
    check_memory_format(grad_input, channels_last, what + " grad_input")


def torch_indices(argmax: torch.Tensor, window: dict, width: int) -> torch.Tensor:
    """Window offsets i * kw + j as torch's flat input indices ih * W + iw."""
    (_, kw), (sh, sw), (ph, pw), (dh, dw) = (window[key] for key in WINDOW_KEYS)
    oh = torch.arange(argmax.shape[2], device=argmax.device).view(1, 1, -1, 1)
    ow = torch.arange(argmax.shape[3], device=argmax.device).view(1, 1, 1, -1)
    offset = argmax.long()
    ih = oh * sh - ph + (offset // kw) * dh
    iw = ow * sw - pw + (offset % kw) * dw
    return ih * width + iw


# --------------------------------------------------------------------------------------------
# max_pool2d


def run_max_pool2d(backend: str, x: torch.Tensor, window: dict, ceil_mode: bool, grad_layout: str,
                   equal_nan: bool = False):
    """Forward values, argmax and memory format, then the backward of a random upstream gradient."""
    what = f"{backend} max_pool2d {tuple(x.shape)} strides {x.stride()} {x.dtype} {window} ceil_mode={ceil_mode}"
    output_size = shapes.pool2d_output_size(x.shape, ceil_mode=ceil_mode, **window)
    channels_last = shapes.is_channels_last(x)
    out, argmax = backend_op("max_pool2d", backend)(x, **window, output_size=output_size)

    x_ref = x.detach().double().requires_grad_()
    ref, ref_indices = F.max_pool2d(x_ref, ceil_mode=ceil_mode, return_indices=True, **window)
    check_close(out, ref, x.dtype, what + " output", equal_nan)
    check_memory_format(out, channels_last, what + " output")
    check_memory_format(argmax, channels_last, what + " argmax")
    assert argmax.dtype == shapes.window_index_dtype(window["kernel_size"][0] * window["kernel_size"][1]), what
    assert torch.equal(torch_indices(argmax, window, x.shape[3]), ref_indices), what + " argmax"

    grad_output = with_layout(random_values(out.shape, x.dtype, x.device), grad_layout)
    grad_input = backend_op("max_pool2d_backward", backend)(grad_output, argmax, x.shape[2:], **window,
                                                            channels_last=channels_last)
    check_grad_input(grad_input, grad_output, ref, x_ref, channels_last, what)


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_max_pool2d(backend, case, layout, dtype, seed):
    rng = random.Random(seed)
    x, window, ceil_mode = random_max_pool_case(rng, dtype, layout, device_for(backend))
    run_max_pool2d(backend, x, window, ceil_mode, rng.choice(LAYOUTS))


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool2d_ties_infinities_and_nan(backend, layout, dtype, seed):
    """torch's rule: the first maximum wins ties, an all -inf window points at its first valid
    element, NaN propagates with the last NaN winning."""
    rng = random.Random(seed)
    x, window, ceil_mode = random_max_pool_case(rng, dtype, layout, device_for(backend), special=True)
    run_max_pool2d(backend, x, window, ceil_mode, rng.choice(LAYOUTS), equal_nan=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_pool2d_window_over_128_elements(backend, seed):
    """A 13 x 11 window needs int16 window offsets."""
    window = {"kernel_size": (13, 11), "stride": (2, 3), "padding": (6, 5), "dilation": (1, 1)}
    run_max_pool2d(backend, random_values((1, 2, 9, 7), torch.float32, device_for(backend)), window, True, "contiguous")


# --------------------------------------------------------------------------------------------
# avg_pool2d


def run_avg_pool2d(backend, x, window, ceil_mode, count_include_pad, divisor_override, grad_layout):
    what = (
        f"{backend} avg_pool2d {tuple(x.shape)} strides {x.stride()} {x.dtype} {window} ceil_mode={ceil_mode} "
        f"count_include_pad={count_include_pad} divisor_override={divisor_override}"
    )
    output_size = shapes.pool2d_output_size(x.shape, ceil_mode=ceil_mode, dilation=(1, 1), **window)
    channels_last = shapes.is_channels_last(x)
    out = backend_op("avg_pool2d", backend)(
        x, **window, output_size=output_size, count_include_pad=count_include_pad, divisor_override=divisor_override
    )

    x_ref = x.detach().double().requires_grad_()
    ref = F.avg_pool2d(
        x_ref, ceil_mode=ceil_mode, count_include_pad=count_include_pad, divisor_override=divisor_override, **window
    )
    check_close(out, ref, x.dtype, what + " output")
    check_memory_format(out, channels_last, what + " output")

    grad_output = with_layout(random_values(out.shape, x.dtype, x.device), grad_layout)
    grad_input = backend_op("avg_pool2d_backward", backend)(
        grad_output, x.shape[2:], **window, count_include_pad=count_include_pad,
        divisor_override=divisor_override, channels_last=channels_last,
    )
    check_grad_input(grad_input, grad_output, ref, x_ref, channels_last, what)


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_avg_pool2d(backend, case, layout, dtype, seed):
    rng = random.Random(seed)
    window = random_window(rng, dilated=False)
    x = with_layout(random_values(random_shape(rng, window), dtype, device_for(backend)), layout)
    del window["dilation"]
    run_avg_pool2d(
        backend, x, window, rng.random() < 0.5, rng.random() < 0.5, rng.choice([None, rng.randint(1, 7)]), rng.choice(LAYOUTS)
    )


# --------------------------------------------------------------------------------------------
# adaptive_avg_pool2d


def run_adaptive_avg_pool2d(backend, x, output_size, grad_layout):
    what = f"{backend} adaptive_avg_pool2d {tuple(x.shape)} strides {x.stride()} {x.dtype} output_size={output_size}"
    channels_last = shapes.is_channels_last(x)
    out = backend_op("adaptive_avg_pool2d", backend)(x, output_size)

    x_ref = x.detach().double().requires_grad_()
    ref = F.adaptive_avg_pool2d(x_ref, output_size)
    check_close(out, ref, x.dtype, what + " output")
    check_memory_format(out, channels_last, what + " output")

    grad_output = with_layout(random_values(out.shape, x.dtype, x.device), grad_layout)
    grad_input = backend_op("adaptive_avg_pool2d_backward", backend)(grad_output, x.shape[2:], channels_last)
    check_grad_input(grad_input, grad_output, ref, x_ref, channels_last, what)


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_adaptive_avg_pool2d(backend, case, layout, dtype, seed):
    """Output sizes above and below the input's; one case in four is global average pooling."""
    rng = random.Random(seed)
    x = with_layout(random_values(random_shape(rng), dtype, device_for(backend)), layout)
    output_size = (1, 1) if rng.random() < 0.25 else (rng.randint(1, 13), rng.randint(1, 13))
    run_adaptive_avg_pool2d(backend, x, output_size, rng.choice(LAYOUTS))


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes())
def test_channels_moved_sixteen_bytes_at_a_time(backend, dtype, seed):
    """channels_last with 16 channels: the CUDA kernels move 8 (fp16/bf16) or 4 (fp32) channels per
    16-byte access, forward and backward, the argmax too."""
    rng = random.Random(seed)
    device = device_for(backend)
    x, window, ceil_mode = random_max_pool_case(rng, dtype, "channels_last", device)
    x = with_layout(random_values((x.shape[0], 16, *x.shape[2:]), dtype, device), "channels_last")
    run_max_pool2d(backend, x, window, ceil_mode, "channels_last")
    del window["dilation"]
    run_avg_pool2d(backend, x, window, ceil_mode, True, None, "channels_last")
    run_adaptive_avg_pool2d(backend, x, (rng.randint(1, 4), rng.randint(1, 4)), "channels_last")


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes(backends=("cuda",)))
def test_wide_nchw_windows_split_over_lanes(backend, dtype):
    """NCHW windows of 16 elements or more: the CUDA forward splits each window row over 2..32 lanes
    that merge their maxima (ties, -inf and NaN by torch's rule) or sums with warp shuffles (the
    Triton interpreter would take 20 s a dtype for these windows)."""
    device = device_for(backend)
    x = random_values((2, 3, 12, 40), dtype, device, special=True)
    for kernel, stride in (((4, 4), (2, 3)), ((2, 9), (1, 4)), ((3, 33), (2, 1))):
        window = {"kernel_size": kernel, "stride": stride, "padding": (kernel[0] // 2, kernel[1] // 2),
                  "dilation": (1, 1)}
        run_max_pool2d(backend, x, window, False, "contiguous", equal_nan=True)
    x = random_values((2, 3, 12, 40), dtype, device)
    run_avg_pool2d(backend, x, {"kernel_size": (3, 17), "stride": (2, 5), "padding": (1, 8)}, True, False, None,
                   "contiguous")
    run_adaptive_avg_pool2d(backend, x, (1, 1), "contiguous")


# --------------------------------------------------------------------------------------------
# Edge cases shared by all launchers


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch_launches_nothing(backend, layout):
    x = with_layout(torch.empty((0, 3, 5, 6), device=device_for(backend)), layout)
    window = {"kernel_size": (2, 2), "stride": (2, 2), "padding": (1, 0), "dilation": (1, 1)}
    out, argmax = backend_op("max_pool2d", backend)(x, **window, output_size=(3, 3))
    assert out.shape == argmax.shape == (0, 3, 3, 3)
    grad_input = backend_op("max_pool2d_backward", backend)(out, argmax, (5, 6), **window, channels_last=False)
    assert grad_input.shape == (0, 3, 5, 6)
    del window["dilation"]
    out = backend_op("avg_pool2d", backend)(x, **window, output_size=(3, 3), count_include_pad=True,
                                            divisor_override=None)
    assert out.shape == (0, 3, 3, 3)
    grad_input = backend_op("avg_pool2d_backward", backend)(
        out, (5, 6), **window, count_include_pad=True, divisor_override=None, channels_last=True
    )
    assert grad_input.shape == (0, 3, 5, 6)
    out = backend_op("adaptive_avg_pool2d", backend)(x, (2, 4))
    assert out.shape == (0, 3, 2, 4)
    assert backend_op("adaptive_avg_pool2d_backward", backend)(out, (5, 6), False).shape == (0, 3, 5, 6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_adaptive_avg_pool2d_empty_output(backend):
    device = device_for(backend)
    x = random_values((2, 3, 5, 6), torch.float32, device)
    assert backend_op("adaptive_avg_pool2d", backend)(x, (0, 4)).shape == (2, 3, 0, 4)
    grad_input = backend_op("adaptive_avg_pool2d_backward", backend)(torch.empty((2, 3, 0, 4), device=device),
                                                                     (5, 6), False)
    assert torch.equal(grad_input, torch.zeros((2, 3, 5, 6), device=device))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inner_axis_wider_than_one_block(backend, layout, seed):
    """More than MAX_BLOCK_INNER channels (channels_last) or columns (NCHW): several Triton programs
    along the grid's second axis, several CUDA blocks."""
    rng = random.Random(seed)
    wide = pooling.MAX_BLOCK_INNER + 3
    shape = (1, wide, 3, 2) if layout == "channels_last" else (1, 2, 3, wide)
    x = with_layout(random_values(shape, torch.float32, device_for(backend)), layout)
    window = {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 1), "dilation": (1, 1)}
    run_max_pool2d(backend, x, window, False, layout)
    del window["dilation"]
    run_avg_pool2d(backend, x, window, True, False, None, layout)
    run_adaptive_avg_pool2d(backend, x, (2, rng.randint(1, 5)), layout)


@pytest.mark.cuda
def test_cuda_adaptive_axis_past_31_bits_takes_64_bit_index_math():
    """An adaptive axis whose products in * out pass 2^31 (50000 -> 50001) runs the CUDA kernels with
    int64 divisions instead of 32-bit magic numbers."""
    x = random_values((1, 2, 1, 50000), torch.float32, device_for("cuda"))
    run_adaptive_avg_pool2d("cuda", x, (1, 50001), "contiguous")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_int64_index_arithmetic(layout, monkeypatch, seed):
    """Tensors past 2**31 elements take int64 index math; force it on small ones."""
    monkeypatch.setattr(pooling, "_index_dtype", lambda *tensors, products=(): tl.int64)
    rng = random.Random(seed)
    device = device_for("triton")
    x, window, ceil_mode = random_max_pool_case(rng, torch.float32, layout, device)
    run_max_pool2d("triton", x, window, ceil_mode, layout)
    window = random_window(rng, dilated=False)
    x = with_layout(random_values(random_shape(rng, window), torch.float32, device), layout)
    del window["dilation"]
    run_avg_pool2d("triton", x, window, False, True, None, layout)
    run_adaptive_avg_pool2d("triton", x, (3, 2), layout)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float64_accumulates_in_float64(backend, seed):
    x = random_values((2, 3, 7, 9), torch.float64, device_for(backend))
    out = backend_op("adaptive_avg_pool2d", backend)(x, (2, 3))
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(x, (2, 3)), rtol=1e-13, atol=1e-13)
    out = backend_op("avg_pool2d", backend)(x, (3, 3), (2, 2), (1, 1), (4, 5), False, None)
    torch.testing.assert_close(out, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), rtol=1e-13, atol=1e-13)
