"""bench/gpu_run.sh: its stages fit one 9-minute call, and its dry run goes through every stage's
plumbing on CPU, returns at most 8 files and verifies nothing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_run.sh"
STAGES = ["info", "build", "tests", "headline", "memcheck", "first-call", "rest", "verify"]


def test_stage_deadlines_fit_one_call_of_nine_minutes():
    text = SCRIPT.read_text()
    deadlines = {name: int(deadline) for name, deadline in re.findall(r"^\s*run_stage ([\w-]+) (\d+) ", text, re.MULTILINE)}
    assert list(deadlines) == STAGES and list(deadlines.values()) == sorted(deadlines.values())
    assert deadlines["verify"] <= 540  # each stage ends by its deadline, so the budgets add up to the last one
    # the memcheck subset names tests that exist
    for node in re.search(r'MEMCHECK_TESTS="([^"]+)"', text).group(1).replace("\\\n", " ").split():
        path, name = node.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), node


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real run is the test (bash bench/gpu_run.sh)")
def test_dry_run_goes_through_every_stage_and_verifies_nothing(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["benchmarks.md", "gpu_run.log", "junit.xml", "results.json", "run.json", "stages.jsonl",
                     "tuned_configs.json", "verified.json"]
    stages = {s["stage"]: s for s in map(json.loads, (out / "stages.jsonl").read_text().splitlines())}
    assert list(stages) == STAGES
    assert all(s["exit"] == 0 for name, s in stages.items() if name != "memcheck"), stages
    assert json.loads((out / "run.json").read_text())["gpu"] is False
    assert json.loads((out / "verified.json").read_text())["verified"] == []
    assert "Nothing verified:** the run had no CUDA GPU" in (out / "benchmarks.md").read_text()
    # the tests recorded the kernels they ran, on the CPU
    recorded = [json.loads(p.get("value")) for p in ElementTree.parse(out / "junit.xml").getroot().iter("property")
                if p.get("name") == "vkernels_kernels"]
    assert recorded and all(call["where"] == "cpu" for calls in recorded for call in calls)
    results = json.loads((out / "results.json").read_text())
    assert {r["op"] for r in results["results"]} >= {"max_pool2d", "attention", "avg_pool2d"}  # headline, then rest
    assert {c["configs"] for c in results["first_call"]} == {"shipped", "none"}
