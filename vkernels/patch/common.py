"""What every patch rule shares: moving a module's state into its replacement, and finding a model
library's classes without importing the library."""
from __future__ import annotations

import sys

import torch


def share_state(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Register ``old``'s Parameter, buffer and child objects (not copies) under the same names."""
    for name, param in old._parameters.items():
        new._parameters[name] = param
    for name, buffer in old._buffers.items():
        new._buffers[name] = buffer
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        new._modules[name] = child
    new.training = old.training
    return new


def loaded_class(module_name: str, name: str) -> type | None:
    """``module_name.name`` if that module is already imported (a model built from a library means the
    library is), else None: patching never imports a model library."""
    found = getattr(sys.modules.get(module_name), name, None)
    return found if isinstance(found, type) else None
