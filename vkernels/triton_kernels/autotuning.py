"""How the Triton kernels pick a config: interpreted, first, shipped or autotuned.

Every autotuned kernel is decorated with :func:`autotune` (``triton.autotune`` plus these rules).
For a tuning key it has not met in this process (its key arguments and the dtypes of its tensors) a
kernel runs

1. under ``VKERNELS_TRITON_AUTOTUNE=0``, the first config its list allows for the input, without
   benchmarking. The GPU test suite sets it (tests/conftest.py): it meets hundreds of shapes, and
   autotuning each would compile every config of every kernel;
2. else the config shipped for this GPU architecture (compute capability) in
   vkernels/tuned_configs.json, which ``python -m vkernels.verify`` writes from the configs a GPU
   run's benchmarks picked: the entry with the same key, else the nearest one that differs only in
   the kernel's size arguments (by log2 of the sizes). A shipped config the kernel no longer lists is
   ignored;
3. else Triton benchmarks the candidates (only the first ``VKERNELS_TRITON_AUTOTUNE_CONFIGS`` when
   that is set: bench/gpu_run.sh caps it so that its benchmark stage fits) and caches the result on
   disk (``cache_results``, Triton >= 3.4), so a machine tunes a key once, not once per process.

``VKERNELS_TUNED_CONFIGS`` names another configs file, or ``0`` for none. Under TRITON_INTERPRET=1
the kernels have a single small config and never benchmark.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("VKERNELS_TRITON_AUTOTUNE", "1") != "0"
MAX_CANDIDATES = int(os.environ.get("VKERNELS_TRITON_AUTOTUNE_CONFIGS", "0")) or None
CONFIGS_FILE = Path(__file__).resolve().parent.parent / "tuned_configs.json"
ABOUT = ("Triton configs per GPU architecture, kernel and tuning key, from the autotuner's picks in a GPU run's "
         "benchmarks; written by `python -m vkernels.verify RUN_DIR` (see vkernels/triton_kernels/autotuning.py).")


def config_fields(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _plain(value):
    """A key value as JSON keeps it."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


@dataclass
class TunedKernel:
    name: str
    family: str  # its module in vkernels.triton_kernels
    key: tuple[str, ...]
    sizes: frozenset[str]  # key arguments across which a shipped config may be borrowed
    arg_names: tuple[str, ...]
    tuner: triton.runtime.Autotuner | None = None
    # Triton's tuning key -> (the key by argument name, how its config was picked)
    picks: dict[tuple, tuple[dict, str]] = field(default_factory=dict)

    def tuning_key(self, args: dict) -> tuple:
        """Triton's key for these arguments (triton.runtime.Autotuner.run builds it the same way)."""
        named = {name: value for name, value in args.items() if name in self.arg_names}
        return (*[named[name] for name in self.key if name in named],
                *[str(value.dtype) for value in named.values() if hasattr(value, "dtype")])

    def key_fields(self, args: dict) -> dict:
        named = {name: value for name, value in args.items() if name in self.arg_names}
        fields = {name: _plain(named[name]) for name in self.key if name in named}
        fields.update({f"{name}.dtype": str(value.dtype) for name, value in named.items() if hasattr(value, "dtype")})
        return fields

    def candidates(self, allowed: list[triton.Config], args: dict) -> list[triton.Config]:
        """What Triton may benchmark for a new key: one config unless the rules above leave several."""
        fields = self.key_fields(args)
        shipped = self.shipped(fields, allowed, _capability(args)) if AUTOTUNE else None
        if not AUTOTUNE:
            chosen, how = allowed[:1], "first"
        elif shipped is not None:
            chosen, how = [shipped], "shipped"
        else:
            chosen = allowed[:MAX_CANDIDATES]
            how = "only" if len(allowed) == 1 else f"tuned, {len(chosen)} of {len(allowed)}"
        self.picks[self.tuning_key(args)] = (fields, how)
        return chosen

    def shipped(self, fields: dict, allowed: list[triton.Config], capability: str | None) -> triton.Config | None:
        """The shipped config for this key, or for the nearest in size, among ``allowed``."""
        entries = shipped_configs().get(capability, {}).get("kernels", {}).get(self.name, [])
        same_class = [entry for entry in entries if entry["key"].keys() == fields.keys()
                      and all(entry["key"][name] == value for name, value in fields.items() if name not in self.sizes)]

        def distance(entry: dict) -> float:
            return sum(abs(math.log2(max(1, entry["key"][name])) - math.log2(max(1, fields[name])))
                       for name in self.sizes if name in fields)

        for entry in sorted(same_class, key=distance):
            match = next((config for config in allowed if config_fields(config) == entry["config"]), None)
            if match is not None:
                return match
        return None


KERNELS: list[TunedKernel] = []


def autotune(configs: list[triton.Config], key: list[str], *, sizes: tuple[str, ...] = (),
             prune: Callable[[list[triton.Config], dict], list[triton.Config]] | None = None):
    """``triton.autotune(configs, key)`` picking configs by the rules above. ``prune(configs, args)``
    is the kernel's own choice of the configs that suit these arguments (all of them when None);
    ``sizes`` the key arguments across which a shipped config may be borrowed."""

    def decorate(fn):
        module = fn.fn.__module__  # the Python function's: the interpreter's wrapper has its own
        kernel = TunedKernel(fn.__name__, module.rsplit(".", 1)[-1], tuple(key), frozenset(sizes), tuple(fn.arg_names))

        def early_config_prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            return kernel.candidates(prune(configs, args) if prune else list(configs), args)

        kernel.tuner = triton.autotune(configs, key, prune_configs_by={"early_config_prune": early_config_prune},
                                       cache_results=True)(fn)
        KERNELS.append(kernel)
        return kernel.tuner

    return decorate


def _capability(args: dict) -> str | None:
    import torch

    device = next((value.device for value in args.values() if isinstance(value, torch.Tensor)), None)
    if device is None or device.type != "cuda":
        return None
    return "{}.{}".format(*torch.cuda.get_device_capability(device))


@functools.cache
def shipped_configs() -> dict:
    """compute capability -> {"gpu", "date", "triton", "kernels": {kernel: [{"key", "config"}]}}."""
    chosen = os.environ.get("VKERNELS_TUNED_CONFIGS")
    if chosen == "0":
        return {}
    path = Path(chosen) if chosen else CONFIGS_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    return {capability: entry for capability, entry in data.items() if capability != "about"}


def picked_configs() -> list[dict]:
    """The config each kernel runs for each tuning key met so far in this process, and how it was picked."""
    return [{"kernel": kernel.name, "family": kernel.family, "key": kernel.picks.get(key, ({}, ""))[0],
             "config": config_fields(config), "picked": kernel.picks.get(key, ({}, "unknown"))[1]}
            for kernel in KERNELS for key, config in kernel.tuner.cache.items()]


def ship(data: dict, picks: list[dict], capability: str, machine: dict) -> dict:
    """``data`` (a tuned_configs.json) with the autotuned ``picks`` of a run on a GPU of this
    capability added, each replacing the entry of the same kernel and key."""
    entry = data.get(capability, {"kernels": {}})
    kernels = {name: list(entries) for name, entries in entry["kernels"].items()}
    for pick in picks:
        if not pick["picked"].startswith("tuned"):
            continue
        entries = [e for e in kernels.get(pick["kernel"], []) if e["key"] != pick["key"]]
        kernels[pick["kernel"]] = [*entries, {"key": pick["key"], "config": pick["config"]}]
    updated = {"gpu": machine["device"], "date": machine["date"], "triton": machine["triton"],
               "kernels": {name: sorted(entries, key=lambda e: json.dumps(e["key"], sort_keys=True))
                           for name, entries in sorted(kernels.items())}}
    return {"about": ABOUT, **{c: e for c, e in data.items() if c not in ("about", capability)}, capability: updated}
