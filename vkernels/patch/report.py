"""What ``patch(model, report=True)`` returns: what was replaced, and what was left and why."""
from __future__ import annotations

from typing import NamedTuple


class Left(NamedTuple):
    """A rule's answer for a module it recognises but cannot serve: the reason it stays stock."""

    why: str


class PatchReport(list):
    """``(path, what)`` per replaced module (a list, in walk order); ``left`` holds ``(path, why)`` per
    module a rule recognised and left stock. ``str()`` gives both as a table."""

    def __init__(self) -> None:
        super().__init__()
        self.left: list[tuple[str, str]] = []

    def replaced(self, path: str, what: str) -> None:
        self.append((path, what))

    def leave(self, path: str, why: str) -> None:
        self.left.append((path, why))

    def __str__(self) -> str:
        rows = [f"replaced  {path or '<model>'}: {what}" for path, what in self]
        rows += [f"left      {path or '<model>'}: {why}" for path, why in self.left]
        return "\n".join(rows) if rows else "nothing replaced"
