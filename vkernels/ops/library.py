"""The ``vkernels`` torch.library namespace: where every op family defines its per-backend ops."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from vkernels.dispatch import KERNEL_BACKENDS

_LIBRARY = torch.library.Library("vkernels", "FRAGMENT")


def define_backend_ops(
    schemas: Mapping[str, str], fakes: Mapping[str, Callable], triton_launchers: Mapping[str, Callable],
    backends: Sequence[str] = KERNEL_BACKENDS,
) -> None:
    """Defines ``vkernels::<name>_<backend>`` for every kernel backend in ``backends`` with one schema
    and one fake kernel per name, and implements the Triton ones with their launchers (CPU through the
    interpreter, CUDA). The CUDA C++ ones get their kernels from vkernels._C (TORCH_LIBRARY_IMPL),
    which may load before or after this."""
    for backend in backends:
        for name, schema in schemas.items():
            _LIBRARY.define(f"{name}_{backend}{schema}")
            torch.library.register_fake(f"vkernels::{name}_{backend}", fakes[name], lib=_LIBRARY)
    for name, launcher in triton_launchers.items():
        for device in ("CPU", "CUDA"):
            _LIBRARY.impl(f"{name}_triton", launcher, device)


def backend_op(name: str, backend: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.vkernels, f"{name}_{backend}").default


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Floating tensors cast to the autocast dtype when autocast is on for ``device_type``, as torch
    casts the inputs of conv2d and scaled_dot_product_attention; unchanged otherwise."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
