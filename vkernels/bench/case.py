"""What one benchmark case is: inputs, implementations to compare, and the ideal work it does.

Case modules in ``vkernels.bench.cases`` build these; the harness (``python -m vkernels.bench``) and
the pytest-benchmark suite (``bench/``) both time them, so shapes are written once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Stock eager PyTorch: every case has it, it is the reference for the output check and the
# denominator of every speed-up.
BASELINE = "pytorch"

Inputs = dict[str, torch.Tensor]
Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class Case:
    name: str  # "max_pool2d 3x3/2 pad1 256x64x112x112 bf16 channels_last fwd"
    family: str  # op family, one table per family ("pooling")
    direction: str  # "fwd" or "fwd+bwd"
    make_inputs: Callable[[], Inputs]  # fresh random inputs on every call
    impls: dict[str, Callable[[Inputs], Outputs]]  # must hold BASELINE
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it is not run
    bytes_moved: int | None = None  # device-memory traffic of an ideal implementation
    flops: int | None = None  # floating-point operations of an ideal implementation
    tolerance: float = 1e-5  # largest relative error against BASELINE that counts as a match


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed against stock PyTorch: a few roundings in the output dtype."""
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def forward_only(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Inputs], Outputs]:
    return lambda inputs: forward(inputs["x"])


def forward_backward(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Inputs], Outputs]:
    """The forward on inputs["x"] and its gradient for inputs["grad_out"]. autograd.grad returns the
    gradient instead of accumulating it in x.grad, so repeated calls stay independent."""

    def run(inputs: Inputs) -> Outputs:
        out = forward(inputs["x"])
        (grad_x,) = torch.autograd.grad(out, inputs["x"], inputs["grad_out"])
        return out, grad_x

    return run


def vkernels_impls(
    forward_for_backend: Callable[[str], Callable[[torch.Tensor], torch.Tensor]],
    wrap: Callable[[Callable], Callable[[Inputs], Outputs]],
) -> tuple[dict[str, Callable[[Inputs], Outputs]], dict[str, str]]:
    """One implementation "vk.<backend>" per vkernels backend; unavailable ones go to skipped with
    the reason vkernels.backends() gives."""
    import vkernels

    impls, skipped = {}, {}
    for backend, status in vkernels.backends().items():
        name = f"vk.{backend}"
        if status.available:
            impls[name] = wrap(forward_for_backend(backend))
        else:
            skipped[name] = status.reason
    return impls, skipped


def compiled(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Stock PyTorch under torch.compile (Inductor writes its own kernel). Static shapes: one case,
    one shape; the harness resets dynamo between cases so no case meets the recompile limit."""
    return torch.compile(forward, dynamic=False)
