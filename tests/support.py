"""Helpers shared by the tests: which device a backend runs on, error measures, output poisoning,
training a model a few steps on two backends."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from vkernels import backends

GPU = torch.cuda.is_available()
CPU_DTYPES = (torch.float32, torch.float16)
# The Triton interpreter has no bf16 arithmetic: bf16 is tested on GPUs only.
DTYPES = (*CPU_DTYPES, torch.bfloat16) if GPU else CPU_DTYPES

KERNEL_BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def device_for(backend: str) -> torch.device:
    """The device a backend's kernels run on here; skips the test when the backend is unavailable."""
    status = backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend} unavailable: {status.reason}")
    return torch.device("cuda" if GPU else "cpu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64; NaN anywhere gives inf. floor=1 makes
    it absolute where the expectation is (near) zero, as dQ and dK are when there is a single key."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


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


def assert_trains_identically(model: torch.nn.Module, loss_fn, *, steps: int = 3, lr: float = 0.5, rtol: float = 1e-4,
                              backends: tuple[str, str] = ("torch", "triton")) -> None:
    """From the same weights, ``steps`` SGD steps on the two backends agree: the loss at every step and
    every final parameter within ``rtol``; and the loss moved (the test trained something)."""
    (losses_ref, params_ref), (losses, params) = (train_steps(model, b, loss_fn, steps, lr) for b in backends)
    assert losses == pytest.approx(losses_ref, rel=rtol)
    assert losses_ref[-1] != losses_ref[0]
    assert params.keys() == params_ref.keys()
    for name, param in params_ref.items():
        assert relative_error(params[name], param) <= rtol, name


def as_dtype_of(model: torch.nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The floating-point tensors cast to the model's parameter dtype (float64 for a reference run)."""
    dtype = next(model.parameters()).dtype
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def outputs_and_grads(model: torch.nn.Module, backend: str, run: Callable[[torch.nn.Module], tuple[torch.Tensor, ...]]):
    """A copy of ``model`` on ``backend``: the outputs of ``run(copy)`` and each parameter's gradient of
    the sum of the outputs' squared means."""
    model = copy.deepcopy(model)
    model.backend = backend
    outputs = run(model)
    sum(out.square().mean() for out in outputs).backward()
    return [out.detach() for out in outputs], {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_as_accurate_as_stock(model: torch.nn.Module, run, backend: str = "triton", factor: float = 2.0,
                                floor: float = 1e-5) -> None:
    """Against the same computation in float64 (stock PyTorch), every output of ``run`` and every
    parameter gradient on ``backend`` is within max(``factor`` × stock float32's relative error,
    ``floor``): as accurate as stock, not equal to it (two float32 orders of summation may differ)."""
    exact = outputs_and_grads(copy.deepcopy(model).double(), "torch", run)
    stock = outputs_and_grads(model, "torch", run)
    ours = outputs_and_grads(model, backend, run)
    (outs, grads), (stock_outs, stock_grads), (exact_outs, exact_grads) = ours, stock, exact
    assert grads.keys() == stock_grads.keys() == exact_grads.keys() and grads
    pairs = [(f"output {i}", *triple) for i, triple in enumerate(zip(outs, stock_outs, exact_outs))]
    pairs += [(name, grads[name], stock_grads[name], exact_grads[name]) for name in grads]
    for name, value, stock_value, truth in pairs:
        assert relative_error(value, truth) <= max(factor * relative_error(stock_value, truth), floor), name


def assert_trains_like_float64(model: torch.nn.Module, loss_fn, *, backend: str = "triton", steps: int = 3,
                               lr: float = 0.5, loss_rtol: float = 1e-4, factor: float = 2.0, floor: float = 1e-5) -> None:
    """From the same weights, ``steps`` SGD steps on ``backend`` (float32) follow the same steps in
    float64 on stock PyTorch: the loss at every step within ``loss_rtol`` of float64's, and every
    final parameter within max(``factor`` × stock float32's relative error, ``floor``) of float64's;
    and the loss moved. ``loss_fn`` casts its inputs with :func:`as_dtype_of`."""
    losses_exact, params_exact = train_steps(copy.deepcopy(model).double(), "torch", loss_fn, steps, lr)
    losses_stock, params_stock = train_steps(model, "torch", loss_fn, steps, lr)
    losses, params = train_steps(model, backend, loss_fn, steps, lr)
    assert losses == pytest.approx(losses_exact, rel=loss_rtol)
    assert losses_exact[-1] != losses_exact[0]
    assert params.keys() == params_exact.keys()
    for name, exact in params_exact.items():
        assert relative_error(params[name], exact) <= max(factor * relative_error(params_stock[name], exact), floor), name
