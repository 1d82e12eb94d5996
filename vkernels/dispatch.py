"""Which implementation runs an op: availability, verification, and the choice for each call.

Three backends implement every op family: ``triton`` (vkernels/triton_kernels), ``cuda`` (CUDA C++
in ``vkernels._C``) and ``torch`` (stock PyTorch: the oracle and the CPU fallback). With
``VKERNELS_CUDA_EMULATE=1`` set before import, ``cuda`` runs the same CUDA C++ on CPU tensors
through the emulator build ``vkernels._C_emu`` (csrc/emulation), as ``TRITON_INTERPRET=1`` does for
Triton, and ``auto`` never picks it. A call's backend is its ``backend=`` argument, else the
innermost :func:`use_backend`, else ``"auto"``. ``auto`` takes the first backend of the op's
measured preference order (for the input's GPU architecture, dtype and shape class) that has passed
its tests on a GPU of that architecture, with the same kernel sources, and can serve the input;
stock PyTorch otherwise. Both come from vkernels/verified.json (see :mod:`vkernels.verified`),
written by ``python -m vkernels.verify`` from a GPU run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch

from vkernels import sources, verified
# TRITON_INTERPRET=1: Triton kernels run on CPU tensors with numpy, which has no bf16 arithmetic.
from vkernels.triton_kernels.autotuning import INTERPRETED as TRITON_INTERPRETED

# VKERNELS_CUDA_EMULATE=1: the cuda backend's ops take CPU tensors, run by vkernels._C_emu.
CUDA_EMULATED = os.environ.get("VKERNELS_CUDA_EMULATE", "0") == "1"
# Where the cuda backend's kernels are registered, and the device of the tensors they take.
CUDA_KERNEL_DEVICE = "cpu" if CUDA_EMULATED else "cuda"

KERNEL_BACKENDS = ("triton", "cuda")
BACKENDS = (*KERNEL_BACKENDS, "torch")


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
    if CUDA_EMULATED:
        try:
            emulator = importlib.import_module("vkernels._C_emu")  # importing registers the emulated kernels
        except ImportError as error:
            return BackendStatus(False, f"VKERNELS_CUDA_EMULATE=1 but vkernels._C_emu is not built ({error}); reinstall")
        sanitized = ", AddressSanitizer build" if emulator.sanitized else ""
        return BackendStatus(True, f"CUDA C++ kernels emulated on CPU tensors (VKERNELS_CUDA_EMULATE=1, "
                                   f"vkernels._C_emu{sanitized}): evidence of correctness, never timing")
    try:
        importlib.import_module("vkernels._C")  # importing registers the CUDA kernels
    except ImportError as error:
        return BackendStatus(False, f"vkernels._C is not built ({error}); reinstall with a CUDA toolkit")
    if not torch.cuda.is_available():
        return BackendStatus(False, "vkernels._C is built but there is no CUDA GPU")
    return BackendStatus(True, "CUDA C++ kernels in vkernels._C")


def _built_cuda_source_hashes() -> dict[str, str] | None:
    """Hashes of the csrc/cuda/*.cu that vkernels._C was built from (setup.py bakes them in)."""
    try:
        return json.loads(importlib.import_module("vkernels._C").source_hashes)
    except (ImportError, AttributeError):
        return None


# Read once at import: availability does not change within a process, and torch.compile traces
# plain dict lookups without graph breaks.
_STATUS = {
    "triton": _triton_status(),
    "cuda": _cuda_status(),
    "torch": BackendStatus(True, f"stock PyTorch {torch.__version__}"),
}
# What auto may pick, from vkernels/verified.json: the records whose family's sources hash as in
# their GPU run (vkernels/sources.py), so that a kernel edited since is unverified again.
_VERIFICATION = verified.usable(
    verified.load(),
    lambda family, backend: sources.source_hash(family, backend, cuda_hashes=_built_cuda_source_hashes()),
)
_requested: list[str] = []


@torch.compiler.assume_constant_result
def _capability(device_index: int | None) -> str:
    """The compute capability of a CUDA device (None: the current one), "9.0"; a constant to torch.compile."""
    return "{}.{}".format(*torch.cuda.get_device_capability(device_index))


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


# Registrations are fixed once the extension is loaded: under torch.compile the answer is a constant
# (dynamo cannot trace the dispatcher query itself, which returns a bool).
@torch.compiler.assume_constant_result
def has_cuda_kernel(op: str) -> bool:
    """Whether vkernels._C (or, emulated, vkernels._C_emu) registered a kernel for ``vkernels::<op>_cuda``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"vkernels::{op}_cuda", CUDA_KERNEL_DEVICE.upper())


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
    if backend == "cuda" and device.type != CUDA_KERNEL_DEVICE:
        if CUDA_EMULATED:
            return f"the emulated CUDA kernels (VKERNELS_CUDA_EMULATE=1) take CPU tensors, got a {device.type} tensor"
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
    shape_class: str = verified.ONE_CLASS,
) -> str:
    """The backend that runs one call of the public op ``op``.

    ``dtypes`` are the dtypes the family's kernels take; ``limits`` maps a kernel backend to the reason
    it cannot serve this particular input (a head dim it lacks, say); ``shape_class`` names the input's
    class where backends rank differently by shape (vkernels.shapes).
    """
    name = requested or (_requested[-1] if _requested else "auto")
    _check_name(name)
    limits = limits or {}

    def reason(backend: str) -> str | None:
        return _unfit_reason(backend, op, device, dtype, dtypes) or limits.get(backend)

    if name == "auto":
        if device.type != "cuda" or not _VERIFICATION.verified:  # never a CPU path, nor an emulated one
            return "torch"
        capability = _capability(device.index)
        passed = _VERIFICATION.verified.get((op, capability, dtype), frozenset())
        for backend in _VERIFICATION.preference.get((op, capability, dtype, shape_class), ()):
            if backend == "torch":  # measured faster than every backend after it
                break
            if backend in passed and reason(backend) is None:
                return backend
        return "torch"
    why = reason(name)
    if why is not None:
        others = "; ".join(f"{b}: {reason(b) or 'can serve it'}" for b in BACKENDS if b != name)
        raise BackendUnavailableError(f"{op}: backend {name!r} cannot serve this input: {why}. Others: {others}")
    return name
