"""The verification data, ``vkernels/verified.json``: which kernel backends passed their tests on a
GPU of which architecture, and which backend was fastest there. ``python -m vkernels.verify RUN_DIR``
writes it from a GPU run; vkernels.dispatch reads it once at import. Never edited by hand.

``"verified"``: one record per public op, kernel backend, dtype and compute capability whose tests
all passed on such a GPU, for example::

    {"op": "max_pool2d", "backend": "triton", "dtype": "bfloat16", "capability": "9.0",
     "family": "pooling", "sources": "<vkernels.sources.source_hash of the family, at the run>",
     "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-05", "torch": "2.11.0+cu130", "triton": "3.6.0",
     "cuda": "13.0", "commit": "<git commit of the run>", "tests": {"passed": 41}}

A record counts only while the running code's sources hash to its ``sources``: a kernel edited after
its run is unverified again, in a checkout and in an installed wheel alike (see vkernels.sources).
An sm_90 record says nothing about sm_80 or sm_100.

``"preference"``: one record per op, dtype, shape class and compute capability the benchmarks
measured: ``"order"`` holds the kernel backends faster than stock PyTorch, fastest first, then
``"torch"``, then the slower ones; ``"speedup"`` the geometric mean of each backend's speed-ups over
stock PyTorch across the class's cases. Shape classes come from vkernels.shapes (``"all"`` for ops
with one class).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

DATA_FILE = Path(__file__).with_name("verified.json")
ABOUT = "Written by `python -m vkernels.verify RUN_DIR` from a GPU run (see vkernels/verified.py); not edited by hand."
ONE_CLASS = "all"  # the shape class of ops whose calls all rank the backends alike


class Verification(NamedTuple):
    # (op, capability, dtype) -> kernel backends verified there
    verified: dict[tuple[str, str, torch.dtype], frozenset[str]]
    # (op, capability, dtype, shape class) -> backends in their measured order
    preference: dict[tuple[str, str, torch.dtype, str], tuple[str, ...]]


def load(path: Path = DATA_FILE) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {}
    return {"about": ABOUT, "verified": data.get("verified", []), "preference": data.get("preference", [])}


def dump(data: dict, path: Path = DATA_FILE) -> None:
    """Records in a stable order, one per line, so that a new run's diff shows what changed."""
    fields = ("op", "backend", "dtype", "capability", "shape_class")

    def listing(name: str) -> str:
        records = sorted(data[name], key=lambda record: tuple(str(record.get(field, "")) for field in fields))
        lines = ",\n".join(f"    {json.dumps(record, sort_keys=True)}" for record in records)
        return f'  "{name}": [\n{lines}\n  ]' if records else f'  "{name}": []'

    path.write_text(f'{{\n  "about": {json.dumps(ABOUT)},\n{listing("verified")},\n{listing("preference")}\n}}\n')


def usable(data: dict, current_source_hash: Callable[[str, str], str | None]) -> Verification:
    """The records ``auto`` may follow: verified ones whose family's sources on their backend still
    hash as at their run (``current_source_hash(family, backend)``), and every preference."""
    hashes: dict[tuple[str, str], str | None] = {}
    verified: dict[tuple[str, str, torch.dtype], set[str]] = {}
    for record in data["verified"]:
        where = (record["family"], record["backend"])
        if where not in hashes:
            hashes[where] = current_source_hash(*where)
        if hashes[where] is not None and hashes[where] == record["sources"]:
            verified.setdefault((record["op"], record["capability"], getattr(torch, record["dtype"])), set()).add(record["backend"])
    preference = {
        (record["op"], record["capability"], getattr(torch, record["dtype"]), record["shape_class"]): tuple(record["order"])
        for record in data["preference"]
    }
    return Verification({key: frozenset(backends) for key, backends in verified.items()}, preference)
