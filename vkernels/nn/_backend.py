"""The ``backend=`` keyword every vkernels.nn module adds to its torch.nn constructor."""
from __future__ import annotations


class _BackendChoice:
    """``backend=None`` defers at call time to ``vkernels.use_backend``, else ``auto``."""

    def __init__(self, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    def extra_repr(self) -> str:
        config = super().extra_repr()
        return config if self.backend is None else f"{config}, backend={self.backend!r}"
