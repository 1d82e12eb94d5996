"""What one benchmark case is: inputs, implementations to compare, and the ideal work it does.

Case modules in ``vkernels.bench.cases`` build these; the harness (``python -m vkernels.bench``) and
the pytest-benchmark suite (``bench/``) both time them, so shapes are written once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vkernels.verified import ONE_CLASS

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
    items: int | None = None  # images (or samples) one call processes: the report shows items/s
    op: str | None = None  # the public op it times (None: a whole model)
    dtype: str | None = None  # its compute dtype, as torch names it ("bfloat16")
    shape_class: str = ONE_CLASS  # vkernels.shapes' class of the input: preference orders are per class
    headline: bool = False  # one of the anchor shapes of the README's targets (--headline)


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """As torch names it, and vkernels/verified.json records it: "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed against stock PyTorch: a few roundings in the output dtype."""
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def forward_only(forward: Callable[..., torch.Tensor], args: tuple[str, ...] = ("x",)) -> Callable[[Inputs], Outputs]:
    """forward(*inputs[args]): the inputs named in ``args``, in that order."""
    return lambda inputs: forward(*(inputs[name] for name in args))


def forward_backward(forward: Callable[..., torch.Tensor], args: tuple[str, ...] = ("x",)) -> Callable[[Inputs], Outputs]:
    """The forward on inputs[args] and, for inputs["grad_out"], the gradient of each of those inputs
    that requires grad, in ``args`` order. autograd.grad returns the gradients instead of
    accumulating them in .grad, so repeated calls stay independent."""

    def run(inputs: Inputs) -> Outputs:
        tensors = [inputs[name] for name in args]
        out = forward(*tensors)
        grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], inputs["grad_out"])
        return out, *grads

    return run


def vkernels_impls(
    op: str,
    forward_for_backend: Callable[[str], Callable[..., torch.Tensor]],
    wrap: Callable[[Callable], Callable[[Inputs], Outputs]],
) -> tuple[dict[str, Callable[[Inputs], Outputs]], dict[str, str]]:
    """One implementation "vk.<backend>" per vkernels backend that can run ``op``; the others go to
    skipped, with the reason vkernels.backends() gives or the missing CUDA kernel."""
    import vkernels
    from vkernels.dispatch import has_cuda_kernel

    impls, skipped = {}, {}
    for backend, status in vkernels.backends().items():
        name = f"vk.{backend}"
        if not status.available:
            skipped[name] = status.reason
        elif backend == "cuda" and not has_cuda_kernel(op):
            skipped[name] = f"vkernels._C has no CUDA kernel for {op} yet"
        else:
            impls[name] = wrap(forward_for_backend(backend))
    return impls, skipped


def compiled(forward: Callable[..., torch.Tensor], mode: str | None = None) -> Callable[..., torch.Tensor]:
    """Stock PyTorch under torch.compile (Inductor writes its own kernel) in ``mode`` (None = default).
    Static shapes: one case, one shape; the harness resets dynamo between cases so no case meets the
    recompile limit."""
    return torch.compile(forward, dynamic=False, mode=mode)
