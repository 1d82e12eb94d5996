"""Which implementation runs an op: availability, verification, and the choice for each call.

Three backends implement every op family: ``triton`` (vkernels/triton_kernels), ``cuda`` (CUDA C++ in
``vkernels._C``) and ``torch`` (stock PyTorch: the oracle and the CPU fallback). A call's backend is
its ``backend=`` argument, else the innermost :func:`use_backend`, else ``"auto"``. ``auto`` takes
the first backend of an op's preference order that has passed its tests on a real GPU (listed in
``VERIFIED``) and can serve the input, and stock PyTorch otherwise.
"""
from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch

# TRITON_INTERPRET=1: Triton kernels run on CPU tensors with numpy, which has no bf16 arithmetic.
from vkernels.triton_kernels.autotuning import INTERPRETED as TRITON_INTERPRETED

KERNEL_BACKENDS = ("triton", "cuda")
BACKENDS = (*KERNEL_BACKENDS, "torch")

# Public op ("max_pool2d", "attention", "conv2d_relu", ...) -> kernel backends whose tests passed on
# a GPU (see BENCHMARKS.md). Only these are eligible for ``auto``. Nothing has run on a GPU yet.
VERIFIED: Mapping[str, frozenset[str]] = {}

# Public op -> backends in the order ``auto`` tries them, fastest first from the benchmarks in
# BENCHMARKS.md; "torch" ends the search (stock PyTorch beats the backends after it). Ops not listed
# try KERNEL_BACKENDS in order.
PREFERENCE: Mapping[str, tuple[str, ...]] = {}


class BackendStatus(NamedTuple):
    available: bool
    reason: str


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the input; the message lists every backend's reason."""


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "the triton package is not installed")
    if TRITON_INTERPRETED:
        return BackendStatus(True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, no bf16")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)")
    return BackendStatus(True, "Triton on CUDA GPUs")


def _cuda_status() -> BackendStatus:
    try:
        importlib.import_module("vkernels._C")  # importing registers the CUDA kernels
    except ImportError as error:
        return BackendStatus(False, f"vkernels._C is not built ({error}); reinstall with a CUDA toolkit")
    if not torch.cuda.is_available():
        return BackendStatus(False, "vkernels._C is built but there is no CUDA GPU")
    return BackendStatus(True, "CUDA C++ kernels in vkernels._C")


# Read once at import: availability does not change within a process, and torch.compile traces
# plain dict lookups without graph breaks.
_STATUS = {
    "triton": _triton_status(),
    "cuda": _cuda_status(),
    "torch": BackendStatus(True, f"stock PyTorch {torch.__version__}"),
}
_requested: list[str] = []


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability in this process, with the reason."""
    return dict(_STATUS)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the vkernels calls inside the block on ``name`` unless a call passes ``backend=``."""
    _check_name(name)
    _requested.append(name)
    try:
        yield
    finally:
        _requested.pop()


def _check_name(name: str) -> None:
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown vkernels backend {name!r}; expected one of {(*BACKENDS, 'auto')}")


def has_cuda_kernel(op: str) -> bool:
    """Whether vkernels._C registered a CUDA kernel for ``vkernels::<op>_cuda``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"vkernels::{op}_cuda", "CUDA")


def _unfit_reason(backend: str, op: str, device: torch.device, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why ``backend`` cannot run ``op`` on a tensor of this device and dtype, or None."""
    status = _STATUS[backend]
    if not status.available:
        return status.reason
    if backend == "torch":
        return None
    if backend == "cuda" and not has_cuda_kernel(op):
        return f"vkernels._C has no CUDA kernel for {op} yet"
    if dtype not in dtypes:
        return f"dtype {dtype} is not one of {[str(d).removeprefix('torch.') for d in dtypes]}"
    if backend == "cuda" and device.type != "cuda":
        return f"CUDA kernels need CUDA tensors, got a {device.type} tensor"
    if backend == "triton":
        if TRITON_INTERPRETED and device.type != "cpu":
            return "the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only"
        if not TRITON_INTERPRETED and device.type != "cuda":
            return f"Triton kernels need CUDA tensors, got a {device.type} tensor (or set TRITON_INTERPRET=1)"
        if TRITON_INTERPRETED and dtype == torch.bfloat16:
            return "the Triton interpreter has no bf16 arithmetic"
    return None


def choose(
    requested: str | None,
    device: torch.device,
    dtype: torch.dtype,
    dtypes: tuple[torch.dtype, ...],
    limits: Mapping[str, str] | None = None,
    *,
    op: str,
) -> str:
    """The backend that runs one call of the public op ``op``.

    ``dtypes`` are the dtypes the family's kernels take; ``limits`` maps a kernel backend to the reason
    it cannot serve this particular input (a head dim it lacks, say).
    """
    name = requested or (_requested[-1] if _requested else "auto")
    _check_name(name)
    limits = limits or {}

    def reason(backend: str) -> str | None:
        return _unfit_reason(backend, op, device, dtype, dtypes) or limits.get(backend)

    if name == "auto":
        verified = VERIFIED.get(op, frozenset())
        for backend in PREFERENCE.get(op, KERNEL_BACKENDS):
            if backend == "torch":
                break
            if backend in verified and device.type == "cuda" and reason(backend) is None:
                return backend
        return "torch"
    why = reason(name)
    if why is not None:
        others = "; ".join(f"{b}: {reason(b) or 'can serve it'}" for b in BACKENDS if b != name)
        raise BackendUnavailableError(f"{op}: backend {name!r} cannot serve this input: {why}. Others: {others}")
    return name
