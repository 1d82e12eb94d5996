"""Helpers shared by the tests: which device a backend runs on, error measures, output poisoning."""
from __future__ import annotations

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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere gives inf."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


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
