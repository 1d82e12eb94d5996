"""How a Triton kernel picks its config: first, shipped (exact key or nearest in size) or autotuned;
the tuning keys must be Triton's own. Runs on CPU: nothing here launches a kernel."""
from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl

from vkernels.triton_kernels import autotuning

SMALL = triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2)
LARGE = triton.Config({"BLOCK": 128}, num_warps=8, num_stages=3)


@triton.jit
def _scale_kernel(x_ptr, n, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * HEAD, mask=offsets < n)


@pytest.fixture
def kernel(monkeypatch):
    """A kernel decorated with autotuning.autotune, left out of the package's list afterwards."""
    monkeypatch.setattr(autotuning, "KERNELS", [])
    autotuning.autotune([SMALL, LARGE], key=["n", "HEAD"], sizes=("n",))(_scale_kernel)
    return autotuning.KERNELS[0]


@pytest.fixture
def shipped(monkeypatch, tmp_path):
    """Ships LARGE for n=4096 and SMALL for n=64 (HEAD 2, float32) on compute capability 9.0."""
    entries = [{"key": {"n": n, "HEAD": 2, "x_ptr.dtype": "torch.float32"}, "config": autotuning.config_fields(config)}
               for n, config in ((4096, LARGE), (64, SMALL))]
    path = tmp_path / "tuned_configs.json"
    path.write_text(json.dumps({"about": "test", "9.0": {"gpu": "H100", "kernels": {"_scale_kernel": entries}}}))
    monkeypatch.setenv("VKERNELS_TUNED_CONFIGS", str(path))
    autotuning.shipped_configs.cache_clear()
    yield
    autotuning.shipped_configs.cache_clear()


def args(n: int, head: int = 2, dtype=torch.float32) -> dict:
    return {"x_ptr": torch.empty(1, dtype=dtype), "n": n, "HEAD": head}


def fields(n: int, head: int = 2, dtype: str = "torch.float32") -> dict:
    return {"n": n, "HEAD": head, "x_ptr.dtype": dtype}


def test_shipped_config_for_the_same_key_else_the_nearest_size_of_the_same_class(kernel, shipped):
    allowed = [SMALL, LARGE]
    assert kernel.shipped(fields(4096), allowed, "9.0") is LARGE
    assert kernel.shipped(fields(2000), allowed, "9.0") is LARGE  # log2 distance: 1 from 4096, 5 from 64
    assert kernel.shipped(fields(100), allowed, "9.0") is SMALL
    # no borrowing across what is not a size (a constexpr, a dtype), nor across GPU architectures
    assert kernel.shipped(fields(4096, head=4), allowed, "9.0") is None
    assert kernel.shipped(fields(4096, dtype="torch.float16"), allowed, "9.0") is None
    assert kernel.shipped(fields(4096), allowed, "8.0") is None
    # a shipped config the kernel no longer allows: the next nearest, else none
    assert kernel.shipped(fields(4096), [SMALL], "9.0") is SMALL
    assert kernel.shipped(fields(4096), [triton.Config({"BLOCK": 64})], "9.0") is None


def test_candidates_first_shipped_or_all(kernel, shipped, monkeypatch):
    monkeypatch.setattr(autotuning, "_capability", lambda args: "9.0")
    assert kernel.candidates([SMALL, LARGE], args(4096)) == [LARGE]
    assert kernel.picks[kernel.tuning_key(args(4096))] == (fields(4096), "shipped")
    assert kernel.candidates([SMALL, LARGE], args(4096, head=3)) == [SMALL, LARGE]
    assert kernel.picks[kernel.tuning_key(args(4096, head=3))][1] == "tuned, 2 of 2"
    monkeypatch.setattr(autotuning, "MAX_CANDIDATES", 1)  # VKERNELS_TRITON_AUTOTUNE_CONFIGS=1
    assert kernel.candidates([SMALL, LARGE], args(4096, head=3)) == [SMALL]
    monkeypatch.setattr(autotuning, "AUTOTUNE", False)  # VKERNELS_TRITON_AUTOTUNE=0: never the shipped one
    assert kernel.candidates([SMALL, LARGE], args(4096)) == [SMALL]
    monkeypatch.setenv("VKERNELS_TUNED_CONFIGS", "0")
    autotuning.shipped_configs.cache_clear()
    assert autotuning.shipped_configs() == {}


def test_tuning_keys_and_picks_are_tritons_own(kernel, monkeypatch):
    """Autotuner.run with a stubbed benchmark and launch: its cache keys are the keys we record."""
    tuner = kernel.tuner
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **kw: [1.0 if config is LARGE else 2.0] * 3)
    monkeypatch.setattr(tuner.fn, "run", lambda *a, **kw: None)
    monkeypatch.setattr(autotuning, "_capability", lambda args: None)
    monkeypatch.setattr(tuner, "cache_results", False)
    x = torch.empty(8)
    tuner.run(x, 100, HEAD=2, grid=(1,))
    (key,) = tuner.cache
    assert key == kernel.tuning_key({"x_ptr": x, "n": 100, "HEAD": 2})
    (pick,) = autotuning.picked_configs()
    assert pick == {"kernel": "_scale_kernel", "family": "test_autotuning", "key": fields(100),
                    "config": autotuning.config_fields(LARGE), "picked": "tuned, 2 of 2"}


def test_ship_adds_tuned_picks_per_architecture():
    pick = {"kernel": "k", "family": "conv", "key": fields(64), "config": autotuning.config_fields(LARGE), "picked": "tuned, 2 of 2"}
    machine = {"device": "H100", "date": "today", "triton": "3.6.0"}
    data = autotuning.ship({}, [pick, {**pick, "key": fields(32), "picked": "shipped"}], "9.0", machine)
    assert data["9.0"]["kernels"] == {"k": [{"key": fields(64), "config": autotuning.config_fields(LARGE)}]}
    replaced = autotuning.ship(data, [{**pick, "config": autotuning.config_fields(SMALL)}], "9.0", machine)
    assert replaced["9.0"]["kernels"]["k"] == [{"key": fields(64), "config": autotuning.config_fields(SMALL)}]
    other = autotuning.ship(replaced, [pick], "8.0", machine)
    assert other["9.0"] == replaced["9.0"] and set(other) == {"about", "8.0", "9.0"}
