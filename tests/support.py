"""Helpers shared by the tests: which device a backend runs on, error measures and bounds against a
float64 reference, output poisoning, training a model a few steps on two backends and in float64."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping

import pytest
import torch
import torch.nn.functional as F

import vkernels
from vkernels import backends, dispatch

GPU = torch.cuda.is_available()
CPU_DTYPES = (torch.float32, torch.float16)
ALL_DTYPES = (*CPU_DTYPES, torch.bfloat16)
# The Triton interpreter has no bf16 arithmetic: Triton's bf16 is tested on GPUs only.
DTYPES = ALL_DTYPES if GPU else CPU_DTYPES

KERNEL_BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes a kernel backend is tested in here: all three on a GPU and for the CUDA kernels
    (the emulator does real bf16), fp32 and fp16 in the Triton interpreter."""
    return ALL_DTYPES if backend == "cuda" else DTYPES


def backends_and_dtypes(dtypes: tuple[torch.dtype, ...] = ALL_DTYPES, backends=("triton", "cuda")) -> list:
    """(backend, dtype) parameters: each of ``backends`` with each of ``dtypes`` it is tested in here."""
    return [
        pytest.param(param.values[0], dtype, id=f"{param.id}-{str(dtype).removeprefix('torch.')}", marks=param.marks)
        for param in KERNEL_BACKENDS
        for dtype in dtypes
        if param.values[0] in backends and dtype in dtypes_for(param.values[0])
    ]


def backend_case_params(cases: Mapping[str, object], dtype_of: Callable[[object], torch.dtype]) -> list:
    """(backend, dtype, case) parameters over named cases: the Triton backend runs each case in its own
    dtype where it is tested here, the CUDA kernels in every dtype they are tested in (dtypes_for)."""
    params = []
    for param in KERNEL_BACKENDS:
        backend = param.values[0]
        for name, case in cases.items():
            dtypes = dtypes_for(backend) if backend == "cuda" else [dtype_of(case)]
            params += [pytest.param(backend, dtype, case, id=f"{param.id}-{str(dtype).removeprefix('torch.')}-{name}",
                                    marks=param.marks) for dtype in dtypes if dtype in dtypes_for(backend)]
    return params


def device_for(backend: str) -> torch.device:
    """The device a backend's kernels run on here; skips the test when the backend is unavailable.
    The emulated CUDA kernels (VKERNELS_CUDA_EMULATE=1, set by conftest without a GPU) take CPU tensors."""
    status = backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend} unavailable: {status.reason}")
    if backend == "cuda":
        return torch.device(dispatch.CUDA_KERNEL_DEVICE)
    return torch.device("cuda" if GPU else "cpu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64; NaN anywhere gives inf. floor=1 makes
    it absolute where the expectation is (near) zero, as dQ and dK are when there is a single key."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def tolerance(dtype: torch.dtype) -> float:
    """A bound on the relative error of a single op computed in ``dtype`` against its float64 reference."""
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def rounding_floor(dtype: torch.dtype, reduction: int) -> float:
    """λ·√n·u (λ = 4, u = 2**-p the unit roundoff): the relative error rounding may leave in a sum of
    ``reduction`` terms by Higham and Mary's probabilistic bound, exceeded with probability below
    2·exp(-λ²/2) per sum, and far less often in the norm over a tensor of many sums."""
    return 4 * math.sqrt(reduction) * torch.finfo(dtype).eps / 2


Results = Mapping[str, torch.Tensor]


def assert_as_accurate(ours: Results | torch.Tensor, stock: Results | torch.Tensor, exact: Results | torch.Tensor,
                       floor: float, factor: float = 2.0, stock_exact: Results | None = None) -> None:
    """Each result of ours is at most ``factor`` times as far from ``exact`` (the same computation in
    float64) as stock PyTorch's, plus ``floor``, and has stock's dtype: the pattern of PyTorch's OpInfo
    and FlashAttention's tests. Two low-precision results are never compared with each other, so a
    seed where stock rounds badly passes and one where ours does fails, with both errors printed.
    ``stock_exact``: stock's own float64 reference where it differs from ours' (see Branches)."""
    if isinstance(exact, torch.Tensor):
        ours, stock, exact = {"output": ours}, {"output": stock}, {"output": exact}
    stock_exact = exact if stock_exact is None else stock_exact
    assert ours.keys() == stock.keys() == exact.keys() == stock_exact.keys() and exact
    for name, truth in exact.items():
        assert ours[name].dtype == stock[name].dtype, name
        ours_error, stock_error = relative_error(ours[name], truth), relative_error(stock[name], stock_exact[name])
        assert ours_error <= factor * stock_error + floor, (
            f"{name}: ours {ours_error:.2e}, stock {stock_error:.2e} from float64 (bound {factor} x stock + {floor:.1e})")


class Branches:
    """The discrete choices a forward takes on rounded values: which elements each ReLU passes
    (``vkernels.conv2d_relu``, ``F.relu``) and which window element each ``vkernels.max_pool2d`` picks.
    ``record()`` notes them during a run, ``replay()`` makes a later run (the float64 reference) take
    the same ones, in call order. Two runs in different precisions may round a value within an ulp of a
    kink to either side, and each flip moves a gradient by a whole element's worth: in a tiny model up
    to 30 % of a tensor in bf16, as often for stock as for vkernels (VKERNELS_TEST_SEED=37 of the eval
    ResNet, where vkernels' conv computed the side its rounded inputs give exactly). The float64
    reference of a low-precision run takes that run's branches, so that what is left is rounding."""

    def __init__(self):
        self.choices: list[torch.Tensor] = []
        self._inside_a_recorded_call = False

    def record(self) -> contextlib.AbstractContextManager[Branches]:
        def recorded(function, choice):
            def call(*args, **kwargs):
                if self._inside_a_recorded_call:  # stock conv2d_relu's own F.relu: the same branch
                    return function(*args, **kwargs)
                self._inside_a_recorded_call = True
                try:
                    out = function(*args, **kwargs)
                finally:
                    self._inside_a_recorded_call = False
                self.choices.append(choice(out))
                return out
            return call

        def positive(out):
            return out.detach() > 0

        pool_with_indices = recorded(functools.partial(vkernels.max_pool2d, return_indices=True), lambda out: out[1])

        def max_pool2d(*args, return_indices=False, **kwargs):
            out, indices = pool_with_indices(*args, **kwargs)
            return (out, indices) if return_indices else out

        return self._patched(recorded(vkernels.conv2d_relu, positive), max_pool2d, recorded(F.relu, positive))

    def replay(self) -> contextlib.AbstractContextManager[Branches]:
        choices = iter(self.choices)

        def conv2d_relu_taking_branches(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                                        residual=None, backend=None):
            pre = vkernels.conv2d(input, weight, bias, stride, padding, dilation, groups, residual=residual, backend=backend)
            return pre * next(choices)

        def max_pool2d_taking_branches(input, *args, return_indices=False, **kwargs):
            indices = next(choices)
            out = input.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
            return (out, indices) if return_indices else out

        def relu_taking_branches(input, inplace=False):
            return input * next(choices)

        return self._patched(conv2d_relu_taking_branches, max_pool2d_taking_branches, relu_taking_branches, choices)

    @contextlib.contextmanager
    def _patched(self, conv2d_relu, max_pool2d, relu, replayed: Iterator | None = None) -> Iterator[Branches]:
        saved = vkernels.conv2d_relu, vkernels.max_pool2d, F.relu
        vkernels.conv2d_relu, vkernels.max_pool2d, F.relu = conv2d_relu, max_pool2d, relu
        try:
            yield self
        finally:
            vkernels.conv2d_relu, vkernels.max_pool2d, F.relu = saved
        assert replayed is None or next(replayed, None) is None, "the replayed run took fewer branches than the recorded one"


def poison_allocator(device: torch.device, nbytes: int = 1 << 22) -> None:
    """Fill a block with NaN and free it, so that outputs allocated next likely reuse NaN memory:
    an element a kernel forgets to write then shows up as NaN."""
    block = torch.full((nbytes // 4,), float("nan"), device=device)
    del block


def layout(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as NCHW-contiguous, channels_last, or a non-contiguous view."""
    if kind == "contiguous":
        return tensor.contiguous()
    if kind == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        # every other column of a wider tensor: no dense memory format at all
        wide = torch.empty((*tensor.shape[:-1], tensor.shape[-1] * 2), dtype=tensor.dtype, device=tensor.device)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    raise ValueError(kind)


LAYOUTS = ("contiguous", "channels_last", "strided")


def as_dtype_of(model: torch.nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The floating-point tensors cast to the model's parameter dtype (float64 for a reference run)."""
    dtype = next(model.parameters()).dtype
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def outputs_and_grads(model: torch.nn.Module, backend: str, run: Callable[[torch.nn.Module], tuple[torch.Tensor, ...]],
                      grads: bool = True) -> dict[str, torch.Tensor]:
    """A copy of ``model`` on ``backend``: the outputs of ``run(copy)`` ("output i") and, with ``grads``,
    each parameter's gradient of the sum of the outputs' squared means (taken in float64, so that this
    loss adds no rounding of its own), by parameter name."""
    model = copy.deepcopy(model)
    model.backend = backend
    outputs = run(model)
    results = {f"output {i}": out.detach() for i, out in enumerate(outputs)}
    if grads:
        sum(out.double().square().mean() for out in outputs).backward()
        results |= {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert len(results) > len(outputs), "no parameter has a gradient"
    return results


def assert_as_accurate_as_stock(model: torch.nn.Module, run, backend: str = "triton", floor: float = tolerance(torch.float32),
                                factor: float = 2.0, grads: bool = True) -> None:
    """Every output of ``run`` (and every parameter gradient) on ``backend`` as accurate as on stock
    PyTorch against the same computation in float64: see assert_as_accurate."""
    exact = outputs_and_grads(copy.deepcopy(model).double(), "torch", run, grads)
    stock = outputs_and_grads(model, "torch", run, grads)
    assert_as_accurate(outputs_and_grads(model, backend, run, grads), stock, exact, floor, factor)


def train_steps(model: torch.nn.Module, backend: str, loss_fn: Callable[[torch.nn.Module], torch.Tensor], steps: int = 3,
                lr: float = 0.5) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A copy of ``model`` on ``backend`` trained ``steps`` SGD steps (momentum 0.9) on ``loss_fn(model)``:
    the loss at every step and the final parameters."""
    model = copy.deepcopy(model)
    model.backend = backend
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: param.detach() for name, param in model.named_parameters()}


def assert_trains_like_float64(model: torch.nn.Module, loss_fn, *, backend: str = "triton", steps: int = 3,
                               lr: float = 0.5, loss_rtol: float = 1e-4, loss_atol: float = 1e-6,
                               floor: float = tolerance(torch.float32)) -> None:
    """From the same weights, ``steps`` SGD steps on ``backend`` (float32) follow the same steps in
    float64 on stock PyTorch: the loss at every step within ``loss_rtol`` of float64's (or ``loss_atol``:
    a loss trained to ~0 is a difference of O(10) logits, so float32 holds it to ~10·2^-24 absolute;
    measured 1.3e-7 at a loss of 1e-6, VKERNELS_TEST_SEED=84396261 of the seed CNN), every final
    parameter as close to float64's as stock float32's (assert_as_accurate); and the loss moved.
    ``loss_fn`` casts its inputs with :func:`as_dtype_of`."""
    losses_exact, params_exact = train_steps(copy.deepcopy(model).double(), "torch", loss_fn, steps, lr)
    _, params_stock = train_steps(model, "torch", loss_fn, steps, lr)
    losses, params = train_steps(model, backend, loss_fn, steps, lr)
    assert losses == pytest.approx(losses_exact, rel=loss_rtol, abs=loss_atol)
    assert losses_exact[-1] != losses_exact[0]
    assert_as_accurate(params, params_stock, params_exact, floor)
