"""Pooling parity with torch.nn.functional: values, indices, gradients, memory formats, errors."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import vkernels
from vkernels.shapes import window_index_dtype
from support import KERNEL_BACKENDS, LAYOUTS, device_for, dtypes_for, layout, poison_allocator, relative_error, tolerance

CASES = range(10)


def random_window(rng: random.Random, dilated: bool) -> dict:
    """Window arguments in torch's mixed int / tuple forms, stride larger than kernel included."""
    kernel = (rng.randint(1, 4), rng.randint(1, 4))
    args = {
        "kernel_size": kernel if kernel[0] != kernel[1] or rng.random() < 0.5 else kernel[0],
        "stride": rng.choice([None, (rng.randint(1, 4), rng.randint(1, 4)), rng.randint(1, 5)]),
        "padding": (rng.randint(0, kernel[0] // 2), rng.randint(0, kernel[1] // 2)),
        "ceil_mode": rng.random() < 0.5,
    }
    if dilated:
        args["dilation"] = (rng.randint(1, 3), rng.randint(1, 3))
    return args


def random_input(rng: random.Random, window: dict, device, dtype) -> torch.Tensor:
    kernel = window["kernel_size"] if isinstance(window["kernel_size"], tuple) else (window["kernel_size"],) * 2
    dilation = window.get("dilation", (1, 1))
    # smallest input a window fits in, plus a random margin: odd sizes are common. With dilation, a
    # window over a tiny padded input can hold no input element at all, where torch's CPU max-pool
    # returns an out-of-range index: such inputs are left out.
    height, width = (
        max(1, (k - 1) * d + 1 - (2 * p if d == 1 else 0)) + rng.randint(0, 7)
        for k, d, p in zip(kernel, dilation, window["padding"])
    )
    shape = (rng.randint(1, 3), rng.randint(1, 5), height, width)
    if rng.random() < 0.2:
        shape = shape[1:]  # unbatched
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    return layout(x, rng.choice(LAYOUTS)) if x.dim() == 4 else x


def check_gradient(ours, reference, x, dtype):
    """Backpropagate the same random upstream gradient through ours (x's dtype) and the float64
    reference; compare grad_input."""
    x_ours = x.detach().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    out = ours(x_ours)
    grad = torch.randn_like(out, dtype=torch.float32).to(dtype)
    poison_allocator(x.device)
    out.backward(grad)
    reference(x_ref).backward(grad.double())
    assert x_ours.grad.dtype == x.dtype and x_ours.grad.shape == x.shape
    assert relative_error(x_ours.grad, x_ref.grad) < tolerance(dtype)
    return x_ours.grad


def check_against_torch(ours, reference, x, dtype, context, exact=False):
    """ours(x) against reference(x in float64): dtype, shape, values (exactly, or by relative
    error), the input's memory format kept, and the gradient; outputs land on poisoned memory."""
    poison_allocator(x.device)
    out = ours(x)
    expected = reference(x.double())
    assert out.dtype == dtype and out.shape == expected.shape, context
    if exact:
        assert torch.equal(out.double(), expected), context
    else:
        assert relative_error(out, expected) < tolerance(dtype), context
    assert out.is_contiguous(memory_format=expected_memory_format(x)), context
    check_gradient(ours, reference, x, dtype)


def expected_memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_max_pool2d_matches_torch(backend, case, seed):
    device = device_for(backend)
    rng = random.Random(seed)
    dtype = rng.choice(dtypes_for(backend))
    window = random_window(rng, dilated=True)
    x = random_input(rng, window, device, dtype)

    context = f"window={window} shape={tuple(x.shape)} strides={x.stride()} dtype={dtype}"
    check_against_torch(
        lambda t: vkernels.max_pool2d(t, **window, backend=backend),
        lambda t: F.max_pool2d(t, **window),
        x, dtype, context, exact=True,  # a maximum is exact in any precision
    )
    _, indices = vkernels.max_pool2d(x, **window, return_indices=True, backend=backend)
    _, ref_indices = F.max_pool2d(x.double(), **window, return_indices=True)
    assert torch.equal(indices, ref_indices), context


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_avg_pool2d_matches_torch(backend, case, seed):
    device = device_for(backend)
    rng = random.Random(seed)
    dtype = rng.choice(dtypes_for(backend))
    window = random_window(rng, dilated=False)
    window["count_include_pad"] = rng.random() < 0.5
    window["divisor_override"] = rng.choice([None, None, rng.randint(1, 20)])
    x = random_input(rng, window, device, dtype)

    context = f"window={window} shape={tuple(x.shape)} strides={x.stride()} dtype={dtype}"
    check_against_torch(
        lambda t: vkernels.avg_pool2d(t, **window, backend=backend),
        lambda t: F.avg_pool2d(t, **window),
        x, dtype, context,
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_adaptive_avg_pool2d_matches_torch(backend, case, seed):
    device = device_for(backend)
    rng = random.Random(seed)
    dtype = rng.choice(dtypes_for(backend))
    height, width = rng.randint(1, 12), rng.randint(1, 12)
    # smaller, equal and larger outputs than inputs; None keeps that input size
    output_size = rng.choice([1, (rng.randint(1, 14), rng.randint(1, 14)), (None, rng.randint(1, 5)), rng.randint(1, 6)])
    x = layout(torch.randn(rng.randint(1, 3), rng.randint(1, 5), height, width, device=device).to(dtype), rng.choice(LAYOUTS))

    context = f"output_size={output_size} shape={tuple(x.shape)} strides={x.stride()} dtype={dtype}"
    check_against_torch(
        lambda t: vkernels.adaptive_avg_pool2d(t, output_size, backend=backend),
        lambda t: F.adaptive_avg_pool2d(t, output_size),
        x, dtype, context,
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_pool2d_ties_and_nan_pick_torchs_element(backend):
    """Few distinct values make ties in every window: torch keeps the first maximum; NaN wins."""
    device = device_for(backend)
    x = torch.randint(0, 3, (2, 3, 9, 11), device=device).float()
    x[0, 0, 4, 4] = float("nan")
    x[1, 2, 0, :3] = float("nan")
    for window in ({"kernel_size": 3, "stride": 2, "padding": 1}, {"kernel_size": (2, 3), "stride": 1, "dilation": 2}):
        out, indices = vkernels.max_pool2d(x, **window, return_indices=True, backend=backend)
        ref_out, ref_indices = F.max_pool2d(x.cpu(), **window, return_indices=True)
        assert torch.equal(out.isnan().cpu(), ref_out.isnan())
        assert torch.equal(out.nan_to_num().cpu(), ref_out.nan_to_num())
        assert torch.equal(indices.cpu(), ref_indices)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_pool2d_saves_one_byte_per_output(backend):
    """The backward state of a 3x3 max-pool is an int8 window position, not an int64 index."""
    device = device_for(backend)
    x = torch.randn(1, 2, 7, 7, device=device)
    out, argmax = getattr(torch.ops.vkernels, f"max_pool2d_{backend}")(x, [3, 3], [2, 2], [1, 1], [1, 1], [4, 4])
    assert argmax.dtype == torch.int8 == window_index_dtype(9)
    assert int(argmax.min()) >= 0 and int(argmax.max()) < 9


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_batch(backend):
    device = device_for(backend)
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    for fn, ref in (
        (lambda t, b: vkernels.max_pool2d(t, 3, 2, backend=b), lambda t: F.max_pool2d(t, 3, 2)),
        (lambda t, b: vkernels.avg_pool2d(t, 2, backend=b), lambda t: F.avg_pool2d(t, 2)),
        (lambda t, b: vkernels.adaptive_avg_pool2d(t, 3, backend=b), lambda t: F.adaptive_avg_pool2d(t, 3)),
    ):
        out = fn(x, backend)
        assert out.shape == ref(x).shape
        out.sum().backward()
        assert x.grad.shape == x.shape


@settings(max_examples=12, deadline=None)
@given(
    height=st.integers(1, 10),
    width=st.integers(1, 10),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    ceil_mode=st.booleans(),
    channels_last=st.booleans(),
)
def test_pooling_shape_fuzz(height, width, kernel, stride, ceil_mode, channels_last):
    """Any geometry torch accepts gives torch's result; any it refuses raises torch's error type."""
    backend = "triton"
    device = device_for(backend)
    x = torch.randn(2, 3, height, width, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    padding = (kernel[0] // 2, kernel[1] // 2)
    for ours, theirs in (
        (vkernels.max_pool2d, F.max_pool2d),
        (vkernels.avg_pool2d, F.avg_pool2d),
    ):
        try:
            expected = theirs(x.double(), kernel, stride, padding, ceil_mode=ceil_mode)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                ours(x, kernel, stride, padding, ceil_mode=ceil_mode, backend=backend)
            continue
        # against float64: the float32 result rounded once (max), or a float32 sum of <= 16 terms (avg)
        result = ours(x, kernel, stride, padding, ceil_mode=ceil_mode, backend=backend)
        assert relative_error(result, expected) < tolerance(torch.float32)


BAD_CALLS = {
    "kernel larger than padded input": lambda fn, x: fn(x, 9),
    "padding over half the kernel": lambda fn, x: fn(x, 3, 1, 2),
    "wrong rank": lambda fn, x: fn(x[0, 0], 2),
    "five dims": lambda fn, x: fn(x[None], 2),
    "zero stride": lambda fn, x: fn(x, 2, 0),
    "three-element kernel": lambda fn, x: fn(x, (2, 2, 2)),
    "empty channels": lambda fn, x: fn(x[:, :0], 2),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
@pytest.mark.parametrize("name", ["max_pool2d", "avg_pool2d"])
def test_bad_input_raises_torchs_error(backend, call, name):
    device = device_for(backend)
    x = torch.randn(2, 3, 6, 6, device=device)
    with pytest.raises(Exception) as theirs:
        call(getattr(F, name), x)
    with pytest.raises(type(theirs.value)):
        call(lambda *args: getattr(vkernels, name)(*args, backend=backend), x)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("output_size", [(2, 2, 2), -1, (3, -2)])
def test_adaptive_bad_output_size_raises(backend, output_size):
    x = torch.randn(2, 3, 6, 6, device=device_for(backend))
    with pytest.raises(RuntimeError):
        F.adaptive_avg_pool2d(x, output_size)
    with pytest.raises(RuntimeError):
        vkernels.adaptive_avg_pool2d(x, output_size, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_adaptive_bad_rank_raises(backend):
    x = torch.randn(6, 6, device=device_for(backend))
    with pytest.raises(RuntimeError):
        F.adaptive_avg_pool2d(x, 2)
    with pytest.raises(RuntimeError):
        vkernels.adaptive_avg_pool2d(x, 2, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck: schema, fake kernel, autograd registration and strides agree."""
    device = device_for(backend)
    x = torch.randn(2, 3, 7, 9, device=device, requires_grad=True)
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 3, 4, 5, device=device)
    calls = [
        ("max_pool2d", (x, [3, 3], [2, 2], [1, 1], [1, 1], [4, 5])),
        ("max_pool2d", (x_last, [2, 3], [2, 2], [0, 1], [2, 1], [3, 5])),
        ("avg_pool2d", (x, [3, 3], [2, 2], [1, 1], [4, 5], False, None)),
        ("avg_pool2d", (x_last, [3, 3], [2, 2], [1, 1], [4, 5], True, 5)),
        ("adaptive_avg_pool2d", (x, [4, 5])),
        ("adaptive_avg_pool2d", (x_last, [1, 1])),
        ("avg_pool2d_backward", (grad, [7, 9], [3, 3], [2, 2], [1, 1], True, None, True)),
        ("adaptive_avg_pool2d_backward", (grad, [7, 9], False)),
    ]
    for name, args in calls:
        torch.library.opcheck(getattr(torch.ops.vkernels, f"{name}_{backend}").default, args)
