"""vkernels.conv2d / conv2d_relu: F.conv2d's arguments and results (+ residual, activation), their ops and errors."""
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import vkernels
from support import (
    KERNEL_BACKENDS, assert_as_accurate, backends_and_dtypes, device_for, dtypes_for, layout, poison_allocator,
    relative_error, rounding_floor, tolerance,
)
from vkernels import dispatch, shapes
from vkernels.ops import conv as conv_ops
from vkernels.triton_kernels import conv_common

ACTIVATIONS = [None, *conv_ops.ACTIVATIONS]


class _RoundGradient(torch.autograd.Function):
    """The identity, whose backward rounds the gradient to ``dtype`` (and back to float64)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).double(), None


def reference_activation(pre_activation: torch.Tensor, dtype: torch.dtype, activation: str | None,
                         negative_slope: float) -> torch.Tensor:
    """act(pre_activation) in float64 with what torch's backward (and ours) keeps in ``dtype`` rounded
    to it: the pre-activation the derivative is taken at (the stored conv output; a rounding step at
    hardswish's and relu6's kinks at +-3 and 6 flips the derivative's branch, which no precision of
    the arithmetic would undo) and the gradient w.r.t. the pre-activation (a stored tensor too: its
    rounding decides the bias gradient when that sum cancels)."""
    if activation is None:
        return pre_activation
    rounded = pre_activation + (pre_activation.detach().to(dtype).double() - pre_activation.detach())
    return conv_ops.ACTIVATIONS[activation](_RoundGradient.apply(rounded, dtype), negative_slope)


CALLS = {
    "3x3 pad1 bias residual": dict(weight=(6, 4, 3, 3), padding=1, bias=True, residual=True),
    "same even kernel": dict(weight=(5, 4, 2, 4), padding="same", dilation=(2, 1)),
    "valid stride2": dict(weight=(6, 4, 3, 1), padding="valid", stride=2, bias=True),
    "depthwise": dict(weight=(4, 1, 3, 3), padding=(1, 1), groups=4, residual=True),
    "unbatched groups": dict(weight=(6, 2, 3, 3), stride=(1, 2), groups=2, unbatched=True, residual=True, bias=True),
}


def check_against_float64(backend, x, weight, bias, arguments, with_residual, rtol, activation="relu",
                          negative_slope=0.01):
    """act(F.conv2d(x, weight, bias, **arguments) + residual) in float64 on the same rounded operands:
    output and every gradient within rtol. Where F.conv2d refuses the geometry, ours raises its error
    type. ReLU goes through the public conv2d_relu, the others through conv2d."""
    def ours_for(*args, **kwargs):
        if activation == "relu":
            return vkernels.conv2d_relu(*args, **kwargs, backend=backend)
        return vkernels.conv2d(*args, **kwargs, activation=activation, negative_slope=negative_slope, backend=backend)

    operands = {"input": x, "weight": weight, "bias": bias}
    leaves = {name: t.detach().requires_grad_() for name, t in operands.items() if t is not None}
    refs = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    try:
        pre_activation = F.conv2d(refs["input"], refs["weight"], refs.get("bias"), **arguments)
    except RuntimeError as error:
        with pytest.raises(type(error)):
            ours_for(leaves["input"], leaves["weight"], leaves.get("bias"), **arguments)
        return
    if with_residual:
        leaves["residual"] = torch.randn(pre_activation.shape, device=x.device).to(x.dtype).requires_grad_()
        refs["residual"] = leaves["residual"].detach().double().requires_grad_()
        pre_activation = pre_activation + refs["residual"]
    expected = reference_activation(pre_activation, x.dtype, activation, negative_slope)
    poison_allocator(x.device)
    ours = ours_for(leaves["input"], leaves["weight"], leaves.get("bias"), **arguments, residual=leaves.get("residual"))
    assert ours.shape == expected.shape and ours.dtype == x.dtype
    if x.dim() == 4:
        assert ours.is_contiguous(memory_format=shapes.memory_format(shapes.is_channels_last(x)))
    assert relative_error(ours, expected) < rtol
    if expected.numel() == 0:
        return
    grad = torch.randn_like(ours)
    poison_allocator(x.device)
    ours.backward(grad)
    expected.backward(grad.double())
    for name, leaf in leaves.items():
        assert relative_error(leaf.grad, refs[name].grad) < rtol, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", CALLS)
def test_conv2d_relu_matches_torch(backend, name):
    device = device_for(backend)
    call = dict(CALLS[name])
    weight = torch.randn(call.pop("weight"), device=device) * 0.3
    x = layout(torch.randn(2, 4, 7, 8, device=device), "channels_last")
    if call.pop("unbatched", False):
        x = x[0].contiguous()
    bias = torch.randn(weight.shape[0], device=device) if call.pop("bias", False) else None
    with_residual = call.pop("residual", False)
    check_against_float64(backend, x, weight, bias, call, with_residual, tolerance(torch.float32) * 10)


# Largest errors against float64 of test_conv2d_activation_matches_float64's draws, 40 seeds x every
# activation x both kernel families (fp32 / fp16): Triton outputs 9.1e-7 / 1.0e-3 (a 4-element
# output), gradients 9.3e-6 (gelu_tanh's bias gradient of one channel whose sum cancels) / 4.7e-4;
# CUDA (emulated) outputs and gradients 2.3e-6 / 1.0e-3, bf16 4.7e-3. rtol = 10x / 2x the dtype's
# tolerance leaves at least 4x of margin (bf16: 6x).
def fuzz_rtol(dtype: torch.dtype) -> float:
    return tolerance(dtype) * (10 if dtype == torch.float32 else 2)


def random_call(rng: random.Random, depthwise: bool):
    """(input shape, weight shape, conv arguments) of a small conv drawn from the test's seed: a grouped
    implicit GEMM, or a depthwise conv (3x3 or 5x5 as MobileNets and EfficientNets use, any stride
    and dilation) for the direct kernels."""
    if depthwise:
        channels, kernel, groups = rng.randint(1, 6), rng.choice([3, 5]), None
        weight = (channels, 1, kernel, kernel)
    else:
        groups, kernel = rng.choice([1, 1, 2]), rng.randint(1, 3)
        channels = groups * rng.randint(1, 5)
        weight = (groups * rng.randint(1, 5), channels // groups, kernel, kernel)
    arguments = dict(stride=rng.randint(1, 2), padding=rng.randint(0, kernel // 2), dilation=rng.randint(1, 2),
                     groups=channels if depthwise else groups)
    size = (kernel - 1) * arguments["dilation"] + 1 + rng.randint(0, 5)
    return (rng.randint(1, 2), channels, size, size + rng.randint(0, 2)), weight, arguments


@pytest.mark.parametrize("kind", ["gemm", "depthwise"])
@pytest.mark.parametrize("backend, dtype", backends_and_dtypes())
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_conv2d_activation_matches_float64(activation, backend, dtype, kind, seed):
    """Every activation on both kernel families (implicit GEMM, direct depthwise) of both backends, a
    geometry, memory format, bias, residual and leaky slope drawn from the seed; forward and every gradient."""
    device = device_for(backend)
    rng = random.Random(seed)
    input_shape, weight_shape, arguments = random_call(rng, kind == "depthwise")
    x = layout(torch.randn(input_shape, device=device).to(dtype), rng.choice(["contiguous", "channels_last"]))
    fan_in = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = (torch.randn(weight_shape, device=device) * 2 / fan_in**0.5).to(dtype)  # pre-activations ~N(0, 4)
    bias = torch.randn(weight_shape[0], device=device).to(dtype) if rng.random() < 0.7 else None
    check_against_float64(backend, x, weight, bias, arguments, rng.random() < 0.5, fuzz_rtol(dtype), activation,
                          rng.choice([0.01, 0.2, -0.3]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=12, deadline=None)
@given(
    channels=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),  # in, out per group; groups
    depthwise=st.booleans(),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.sampled_from(["same", "valid"])),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    options=st.tuples(st.booleans(), st.booleans(), st.booleans()),  # bias, residual, channels_last
    data=st.data(),
    activation=st.sampled_from(ACTIVATIONS),
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv2d_geometry_fuzz(backend, channels, depthwise, size, kernel, stride, padding, dilation, options, data,
                              activation):
    """Any geometry F.conv2d accepts gives its result and gradients with every activation; any it refuses
    raises its error type."""
    (cin_per_group, cout_per_group, groups), (with_bias, with_residual, channels_last) = channels, options
    if depthwise:  # one channel per group, as many groups as channels: the direct kernels
        cin_per_group, cout_per_group, groups = 1, 1, cin_per_group + groups
    device = device_for(backend)
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    x = layout(torch.randn(2, cin_per_group * groups, *size, device=device).to(dtype),
               "channels_last" if channels_last else "contiguous")
    weight = (torch.randn(cout_per_group * groups, cin_per_group, *kernel, device=device) * 0.5).to(dtype)
    bias = torch.randn(weight.shape[0], device=device).to(dtype) if with_bias else None
    arguments = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_against_float64(backend, x, weight, bias, arguments, with_residual, fuzz_rtol(dtype), activation)


def test_activation_names_agree_with_the_kernels():
    assert list(conv_common.ACTIVATIONS) == ["none", *conv_ops.ACTIVATIONS]


def test_conv2d_torch_backend_is_the_composition():
    x, w, r = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 3, 3), torch.randn(2, 5, 6, 6)
    ours = vkernels.conv2d(x, w, activation="gelu_tanh", residual=r, backend="torch")
    assert torch.equal(ours, F.gelu(F.conv2d(x, w) + r, approximate="tanh"))
    ours = vkernels.conv2d(x, w, activation="leaky_relu", negative_slope=0.3, backend="torch")
    assert torch.equal(ours, F.leaky_relu(F.conv2d(x, w), 0.3))


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        vkernels.conv2d(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3), activation="tanh")


class SavedPreActivation(TorchDispatchMode):
    """Records save_pre_activation of every vkernels::conv2d_* call and whether a pre-activation came back."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.name().startswith("vkernels::conv2d_") and "backward" not in func.name():
            self.calls.append((func.name(), args[11], result[1] is not None))
        return result


def test_pre_activation_is_written_only_where_a_backward_needs_it():
    """silu's derivative needs the pre-activation: written when a gradient will be taken, not under
    no_grad; relu6 and leaky_relu with a positive slope read the output, and leaky_relu with a negative
    slope cannot."""
    device = device_for("triton")
    x, w = torch.randn(1, 3, 5, 5, device=device), torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    cases = [("silu", 0.01, True), ("relu6", 0.01, False), ("leaky_relu", 0.1, False), ("leaky_relu", -0.1, True)]
    for activation, slope, expected in cases:
        with SavedPreActivation() as saved:
            vkernels.conv2d(x, w, activation=activation, negative_slope=slope, backend="triton")
        with SavedPreActivation() as saved_no_grad, torch.no_grad():
            vkernels.conv2d(x, w, activation=activation, negative_slope=slope, backend="triton")
        assert saved.calls == [("vkernels::conv2d_triton", expected, expected)], activation
        assert saved_no_grad.calls == [("vkernels::conv2d_triton", False, False)], activation


def test_backward_without_the_pre_activation_it_needs_raises():
    device = device_for("triton")
    x = torch.randn(1, 3, 5, 5, device=device, requires_grad=True)
    out, pre = torch.ops.vkernels.conv2d_triton(x, torch.randn(4, 3, 3, 3, device=device), None, None, [1, 1], [0, 0],
                                                [1, 1], 1, [3, 3], "gelu", 0.01, False)
    assert pre is None
    with pytest.raises(RuntimeError, match="save_pre_activation=True"):
        out.sum().backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv2d_opcheck(backend):
    """The activation op with its optional pre-activation output, and without an activation (the
    residual's gradient is grad_output itself)."""
    device = device_for(backend)
    x = torch.randn(2, 4, 6, 7, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    r = torch.randn(2, 6, 3, 4, device=device, requires_grad=True)
    op = getattr(torch.ops.vkernels, f"conv2d_{backend}").default
    torch.library.opcheck(op, (x, w, None, r, [2, 2], [1, 1], [1, 1], 1, [3, 4], "silu", 0.01, True))
    torch.library.opcheck(op, (x, w, torch.randn(6, device=device, requires_grad=True), r, [2, 2], [1, 1], [1, 1], 1,
                               [3, 4], "none", 0.01, False))


BAD_CALLS = {
    "channels not divisible by groups": lambda conv, x: conv(x, torch.randn(6, 2, 3, 3), groups=3),
    "kernel larger than padded input": lambda conv, x: conv(x, torch.randn(6, 4, 9, 9)),
    "weight of wrong rank": lambda conv, x: conv(x, torch.randn(6, 4, 3)),
    "input of wrong rank": lambda conv, x: conv(x[0, 0], torch.randn(6, 4, 3, 3)),
    "same with stride": lambda conv, x: conv(x, torch.randn(6, 4, 3, 3), stride=2, padding="same"),
    "bad padding string": lambda conv, x: conv(x, torch.randn(6, 4, 3, 3), padding="full"),
    "bias of wrong size": lambda conv, x: conv(x, torch.randn(6, 4, 3, 3), torch.randn(5)),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_torchs_error(backend, call):
    device = device_for(backend)
    x = torch.randn(2, 4, 6, 6, device=device)
    with pytest.raises(Exception) as theirs:
        call(F.conv2d, x)
    with pytest.raises(type(theirs.value)):
        call(lambda *a, **k: vkernels.conv2d_relu(*a, **k, backend=backend), x)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_residual_of_wrong_shape_raises(backend):
    x = torch.randn(2, 4, 6, 6, device=device_for(backend))
    with pytest.raises(RuntimeError, match="residual"):
        vkernels.conv2d_relu(x, torch.randn(6, 4, 3, 3), residual=torch.randn(2, 6, 4, 5), backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    x = torch.randn(2, 4, 6, 7, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    r = torch.randn(2, 6, 3, 4, device=device, requires_grad=True)
    op = getattr(torch.ops.vkernels, f"conv2d_relu_{backend}").default
    torch.library.opcheck(op, (x, w, b, r, [2, 2], [1, 1], [1, 1], 1, [3, 4]))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last), w, None, None, [1, 1], [0, 0], [1, 1], 1, [4, 5]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_runs_the_kernel_in_the_autocast_dtype_like_torch(backend):
    """Under autocast conv2d_relu casts like F.conv2d does, so patched AMP models stay in low precision."""
    device = device_for(backend)
    x, w, b = torch.randn(2, 4, 6, 6, device=device), torch.randn(6, 4, 3, 3, device=device), torch.randn(6, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        ours = vkernels.conv2d_relu(x, w, b, padding=1, backend=backend)
        stock = F.relu(F.conv2d(x, w, b, padding=1))
    assert ours.dtype == stock.dtype == torch.float16
    # against float64 on the operands autocast rounds to fp16 once each, summed in float32
    exact = F.relu(F.conv2d(*(t.half().double() for t in (x, w, b)), padding=1))
    assert_as_accurate(ours, stock, exact, rounding_floor(torch.float16, 1))


POOLS = {
    "2x2/2": dict(pool_kernel_size=2),
    "3x3/2 pad1": dict(pool_kernel_size=3, pool_stride=2, pool_padding=1),
}


# input shape, weight shape, conv arguments, pool arguments; sizes that still span several GEMM tiles
# of whole windows while the CUDA emulator runs each case in about a second
MAXPOOL_CASES = {
    "3x3 conv, 2x2/2 pool, odd sizes": ((2, 32, 17, 15), (64, 32, 3, 3), dict(padding=1), POOLS["2x2/2"]),
    "7x7/2 stem, 3x3/2 pad1 pool": ((1, 3, 29, 27), (64, 3, 7, 7), dict(stride=2, padding=3), POOLS["3x3/2 pad1"]),
    "groups of 4 channels": ((2, 8, 13, 11), (24, 4, 3, 3), dict(padding=1, groups=2), POOLS["3x3/2 pad1"]),
    "depthwise": ((2, 16, 11, 10), (16, 1, 3, 3), dict(padding=1, groups=16), POOLS["2x2/2"]),
    "72 channels, 2x3 pool": ((1, 16, 15, 17), (72, 16, 1, 1), {},
                              dict(pool_kernel_size=(2, 3), pool_stride=(1, 2), pool_padding=(1, 0))),
    "9x9 pool": ((1, 8, 21, 20), (16, 8, 3, 3), dict(padding=1), dict(pool_kernel_size=9, pool_stride=4, pool_padding=4)),
    "12x12 pool, int16 argmax": ((1, 8, 27, 26), (16, 8, 3, 3), {}, dict(pool_kernel_size=12, pool_stride=5)),
}


def pool_geometry(pool_args: dict) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel = shapes.pair(pool_args["pool_kernel_size"], "pool_kernel_size")
    return (kernel, shapes.pool_stride(pool_args.get("pool_stride"), kernel, "pool_stride"),
            shapes.pair(pool_args.get("pool_padding", 0), "pool_padding"))


def check_conv2d_relu_maxpool2d(backend, dtype, memory_format, case):
    """Values, argmax and the input, weight and bias gradients against float64. The reference gradient
    goes through our argmax (our pick among near-ties in low precision), whose float64 activations
    must match our maxima: a position in the pool's padding (-inf) or off the maximum fails."""
    input_shape, weight_shape, conv_args, pool_args = case
    device = device_for(backend)
    x = layout(torch.randn(input_shape, device=device).to(dtype), memory_format)
    w = torch.randn(weight_shape, device=device)
    w = (w / w[0].numel() ** 0.5).to(dtype)
    b = torch.randn(weight_shape[0], device=device).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    poison_allocator(device)
    out = vkernels.conv2d_relu_maxpool2d(*leaves, **conv_args, **pool_args, backend=backend)

    kernel, stride, padding = pool_geometry(pool_args)
    conv_stride, conv_padding, conv_dilation, conv_size = shapes.conv2d_geometry(
        x.shape, w.shape, b.shape, conv_args.get("stride", 1), conv_args.get("padding", 0), 1, conv_args.get("groups", 1))
    poison_allocator(device)
    _, argmax = getattr(torch.ops.vkernels, f"conv2d_relu_maxpool2d_{backend}")(
        x, w, b, conv_stride, conv_padding, conv_dilation, conv_args.get("groups", 1), conv_size, kernel, stride,
        padding, out.shape[2:])
    refs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    activation = F.relu(F.conv2d(*refs, **conv_args))
    expected = F.max_pool2d(activation, kernel, stride, padding)
    padded = F.pad(activation, (padding[1], padding[1], padding[0], padding[0]), value=float("-inf"))
    windows = F.unfold(padded, kernel, stride=stride).view(*out.shape[:2], kernel[0] * kernel[1], *out.shape[2:])
    picked = windows.gather(2, argmax.long().unsqueeze(2)).squeeze(2)

    context = f"{backend} {dtype} {memory_format} {case}"
    tol = tolerance(dtype) * (10 if dtype == torch.float32 else 1)
    dense_format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous(memory_format=dense_format), context
    assert argmax.dtype == shapes.window_index_dtype(kernel[0] * kernel[1]) and argmax.shape == out.shape, context
    assert argmax.is_contiguous(memory_format=dense_format), context
    assert relative_error(out, expected) < tol, context
    assert relative_error(picked, expected) < tol, context
    grad = torch.randn_like(out)
    poison_allocator(device)
    out.backward(grad)
    picked.backward(grad.double())
    for name, leaf, ref in zip(("input", "weight", "bias"), leaves, refs):
        assert leaf.grad.dtype == dtype and leaf.grad.shape == ref.shape, f"{name}: {context}"
        assert relative_error(leaf.grad, ref.grad) < tol, f"{name}: {context}"


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", POOLS)
def test_conv2d_relu_maxpool2d_matches_torch(pool, memory_format):
    """A 3x3 conv then each pool on the Triton backend (the interpreter's CPU time keeps it small)."""
    case = ((2, 4, 9, 8), (6, 4, 3, 3), dict(padding=1), POOLS[pool])
    check_conv2d_relu_maxpool2d("triton", torch.float32, memory_format, case)


def test_conv2d_relu_maxpool2d_depthwise_matches_torch():
    """The fused pool over the direct depthwise tiles, on the Triton backend."""
    case = ((1, 8, 7, 6), (8, 1, 3, 3), dict(padding=1, groups=8), POOLS["3x3/2 pad1"])
    check_conv2d_relu_maxpool2d("triton", torch.float32, "channels_last", case)


@pytest.mark.cuda
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", MAXPOOL_CASES)
def test_conv2d_relu_maxpool2d_cuda_matches_torch(case, dtype, memory_format):
    """The CUDA kernels' paths: tensor-core tiles of whole windows (fp16/bf16; 16-byte or element
    gathers), the fp32 FMA tiles, the direct loop (depthwise, windows larger than a tile)."""
    check_conv2d_relu_maxpool2d("cuda", dtype, memory_format, MAXPOOL_CASES[case])


@pytest.mark.cuda
@pytest.mark.parametrize("groups", [1, 8], ids=["gemm", "direct"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_conv2d_relu_maxpool2d_cuda_ties_and_nan_pick_torchs_element(dtype, groups):
    """An identity 1x1 conv makes the activation relu(x): few distinct values (ReLU's zeros among them)
    tie in every window and torch keeps the first maximum; NaN wins, the last NaN of a window."""
    device = device_for("cuda")
    x = torch.randint(-2, 3, (2, 8, 9, 11), device=device).to(dtype)
    x[0, :, 4, 4] = float("nan")
    x[1, :, 0, 1:3] = float("nan")
    w = torch.eye(8, device=device, dtype=dtype).view(8, 8, 1, 1) if groups == 1 else torch.ones(8, 1, 1, 1, device=device, dtype=dtype)
    kernel, stride, padding = (3, 3), (2, 2), (1, 1)
    out, argmax = torch.ops.vkernels.conv2d_relu_maxpool2d_cuda(x, w, None, [1, 1], [0, 0], [1, 1], groups, [9, 11],
                                                                 kernel, stride, padding, [5, 6])
    activation = F.relu(F.conv2d(x.double().cpu(), w.double().cpu(), groups=groups))
    ref_out, indices = F.max_pool2d(activation, kernel, stride, padding, return_indices=True)
    # torch's flat input index as the position in its window
    rows = indices // 11 - (torch.arange(5).view(-1, 1) * stride[0] - padding[0])
    cols = indices % 11 - (torch.arange(6) * stride[1] - padding[1])
    assert torch.equal(out.isnan().cpu(), ref_out.isnan())
    assert torch.equal(out.double().nan_to_num().cpu(), ref_out.nan_to_num())
    assert torch.equal(argmax.long().cpu(), rows * kernel[1] + cols)


def test_conv2d_relu_maxpool2d_torch_backend_is_the_composition():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3)
    ours = vkernels.conv2d_relu_maxpool2d(x, w, stride=1, pool_kernel_size=2, backend="torch")
    torch.testing.assert_close(ours, F.max_pool2d(F.relu(F.conv2d(x, w)), 2))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv2d_relu_maxpool2d_opcheck(backend):
    device = device_for(backend)
    x = torch.randn(2, 4, 7, 6, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    op = getattr(torch.ops.vkernels, f"conv2d_relu_maxpool2d_{backend}").default
    torch.library.opcheck(op, (x, w, b, [1, 1], [1, 1], [1, 1], 1, [7, 6], [3, 3], [2, 2], [1, 1], [4, 3]))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last), w, None, [1, 1], [0, 0], [1, 1],
                               1, [5, 4], [2, 2], [2, 2], [0, 0], [2, 2]))


def test_conv2d_relu_maxpool2d_forced_cuda_raises():
    """Forcing the cuda backend on an input its kernels cannot take (float64) explains why."""
    x, w = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(vkernels.BackendUnavailableError, match="'cuda' cannot serve"):
        vkernels.conv2d_relu_maxpool2d(x, w, pool_kernel_size=2, backend="cuda")


@pytest.mark.cuda
def test_cuda_extension_registers_every_conv_op():
    device_for("cuda")  # skips where neither vkernels._C nor the emulator is loaded
    for op in conv_ops.SCHEMAS:
        assert dispatch.has_cuda_kernel(op), op
