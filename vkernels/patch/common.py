"""What every patch rule shares: moving a module's state into its replacement, replacing a module's
forward on one instance, and finding a model library's classes without importing the library."""
from __future__ import annotations

import functools
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


def wrap_forward(module: torch.nn.Module, forward, backend: str | None) -> None:
    """Run ``forward(module, backend, *args, **kwargs)`` in place of ``module``'s forward, on this
    instance only: the class and its other instances keep theirs, the module keeps its type, state
    and methods, and deepcopy, pickling and torch.compile see the instance attribute."""
    module.forward = functools.partial(forward, module, backend)


def wrapped_forward(module: torch.nn.Module):
    """The function ``wrap_forward`` put in place of ``module``'s forward, else None."""
    found = module.__dict__.get("forward")
    return found.func if isinstance(found, functools.partial) else None
