"""python -m vkernels.verify on small synthetic runs, and the source hashes that keep a record honest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
import torch

from vkernels import sources, verified, verify
from vkernels.bench.machine import kernel_sources

GPU_MACHINE = {
    "title": "NVIDIA H100 80GB HBM3", "date": "2026-12-05 10:00 UTC", "device": "NVIDIA H100 80GB HBM3", "gpu": True,
    "capability": "9.0", "python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0",
    "commit": "0123abc", "command": "bash bench/gpu_run.sh", "copy_gbps": 3000.0, "matmul_tflops": 790.0,
    "backends": {"triton": "available (Triton on CUDA GPUs)", "cuda": "available (CUDA C++ kernels in vkernels._C)",
                 "torch": "available (stock PyTorch 2.11.0)"},
}


def kernel(op: str, backend: str, dtype: str, where: str = "9.0", family: str | None = None) -> dict:
    family = family or {"attention": "attention", "conv2d_relu": "conv"}.get(op, "pooling")
    return {"op": op, "backend": backend, "dtype": dtype, "where": where, "family": family}


def junit(cases: list[tuple[str, str, list[dict]]]) -> str:
    """cases: (test id, "passed" | "failed" | "error" | "skipped" | "out of time", kernels it ran)."""
    rows = []
    for test_id, outcome, kernels in cases:
        classname, name = test_id.split("::")
        body = {"failed": '<failure message="assert">x</failure>', "error": '<error message="boom">x</error>',
                "skipped": '<skipped type="pytest.skip" message="no GPU">x</skipped>',
                "out of time": '<skipped type="pytest.skip" message="out of time: VKERNELS_TEST_DEADLINE passed">x</skipped>',
                "passed": ""}[outcome]
        properties = (f'<properties><property name="vkernels_kernels" value={quoteattr(json.dumps(kernels))} /></properties>'
                      if kernels else "")
        rows.append(f'<testcase classname="{classname}" name="{name}" time="0.1">{properties}{body}</testcase>')
    return f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{"".join(rows)}</testsuite></testsuites>'


def bench_result(case: str, op: str | None, impl: str, status: str = "ok", speedup: float | None = 1.0,
                 shape_class: str = "all", dtype: str = "bfloat16") -> dict:
    return {"case": case, "family": "pooling" if op != "attention" else "attention", "direction": "fwd", "impl": impl,
            "status": status, "note": "", "rel_error": 0.0, "median_ms": 1.0, "min_ms": 1.0, "iqr_ms": 0.0,
            "repeats": 10, "gbps": None, "copy_fraction": None, "tflops": None, "matmul_fraction": None,
            "speedup": speedup, "items_per_s": None, "peak_mib": None, "op": op, "dtype": dtype, "shape_class": shape_class}


def write_run(directory: Path, tests: list | None, results: list[dict] | None = None, machine: dict | None = None,
              stages: list[dict] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    machine = {**(machine or GPU_MACHINE), "sources": kernel_sources()}
    (directory / "run.json").write_text(json.dumps(machine))
    stages = stages or [{"stage": "tests", "exit": 0, "seconds": 100, "budget": 150}]
    (directory / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    if tests is not None:
        (directory / "junit.xml").write_text(junit(tests))
    if results is not None:
        (directory / "results.json").write_text(json.dumps(
            {"machine": machine, "problems": [], "results": results, "autotuned": [], "first_call": []}))
    return directory


def run_verify(run: Path, out: Path) -> tuple[dict, str]:
    assert verify.main([str(run), "--out", str(out)]) == 0
    return json.loads((out / "verified.json").read_text()), (out / "benchmarks.md").read_text()


def records(data: dict) -> set[tuple[str, str, str]]:
    return {(r["op"], r["backend"], r["dtype"]) for r in data["verified"]}


POOLING_TESTS = [
    ("tests.test_pooling::test_max_pool2d_matches_torch[0-triton]", "passed", [kernel("max_pool2d", "triton", "bfloat16")]),
    ("tests.test_pooling::test_max_pool2d_matches_torch[1-triton]", "passed", [kernel("max_pool2d", "triton", "float16")]),
    ("tests.test_pooling::test_max_pool2d_matches_torch[0-cuda]", "passed", [kernel("max_pool2d", "cuda", "bfloat16")]),
    ("tests.test_pooling::test_avg_pool2d_matches_torch[0-triton]", "passed", [kernel("avg_pool2d", "triton", "bfloat16")]),
]


def test_a_run_that_passes_verifies_what_it_ran_on_its_gpu_architecture(tmp_path):
    results = [bench_result("max_pool2d a", "max_pool2d", "pytorch"),
               bench_result("max_pool2d a", "max_pool2d", "vk.triton", speedup=1.5),
               bench_result("max_pool2d a", "max_pool2d", "vk.cuda", speedup=0.8)]
    data, text = run_verify(write_run(tmp_path / "run", POOLING_TESTS, results), tmp_path / "out")
    assert records(data) == {("max_pool2d", "triton", "bfloat16"), ("max_pool2d", "triton", "float16"),
                             ("max_pool2d", "cuda", "bfloat16"), ("avg_pool2d", "triton", "bfloat16")}
    record = next(r for r in data["verified"] if r["backend"] == "cuda")
    assert record["capability"] == "9.0" and record["gpu"] == GPU_MACHINE["device"] and record["commit"] == "0123abc"
    assert record["torch"] == "2.11.0+cu130" and record["tests"] == {"passed": 1} and record["family"] == "pooling"
    (preference,) = data["preference"]
    assert preference["order"] == ["triton", "torch", "cuda"] and preference["speedup"] == {"triton": 1.5, "cuda": 0.8}
    # what auto follows, with this checkout's sources
    table = verified.usable(data, lambda family, backend: kernel_sources()[family][backend])
    assert table.verified[("max_pool2d", "9.0", torch.bfloat16)] == {"triton", "cuda"}
    assert table.preference[("max_pool2d", "9.0", torch.bfloat16, "all")] == ("triton", "torch", "cuda")
    assert "| max_pool2d | cuda | bfloat16 | 1 | verified |" in text and "triton > torch > cuda" in text


def test_one_failure_unverifies_its_kernel_and_an_unattributed_one_its_backend(tmp_path):
    tests = [*POOLING_TESTS,
             ("tests.test_pooling::test_max_pool2d_matches_torch[2-triton]", "failed", [kernel("max_pool2d", "triton", "float16")]),
             ("tests.test_pooling::test_empty_batch[cuda]", "error", [])]
    data, text = run_verify(write_run(tmp_path / "run", tests), tmp_path / "out")
    assert records(data) == {("max_pool2d", "triton", "bfloat16"), ("avg_pool2d", "triton", "bfloat16")}
    assert "failed: tests.test_pooling::test_max_pool2d_matches_torch[2-triton]" in text
    assert "failed without recording a kernel: tests.test_pooling::test_empty_batch[cuda]" in text


def test_a_run_cut_short_verifies_only_what_it_covered(tmp_path):
    tests = [POOLING_TESTS[0], *[(f"tests.test_conv::test_conv2d_relu_matches_torch[{i}-triton]", "out of time", [])
                                 for i in range(3)]]
    data, text = run_verify(write_run(tmp_path / "run", tests), tmp_path / "out")
    assert records(data) == {("max_pool2d", "triton", "bfloat16")}
    assert "1 passed, 0 failed, 0 skipped, 3 not run (out of time)" in text
    # killed before pytest wrote its junit XML: nothing
    data, text = run_verify(write_run(tmp_path / "killed", None), tmp_path / "out-killed")
    assert data["verified"] == [] and "no test results" in text


def test_a_cpu_run_verifies_nothing_and_emulated_kernels_never_count(tmp_path):
    cpu = {**GPU_MACHINE, "gpu": False, "capability": None, "device": "CPU (x86_64, 2 cores)"}
    cpu_tests = [(test_id, outcome, [dict(k, where="cpu") for k in kernels]) for test_id, outcome, kernels in POOLING_TESTS]
    data, text = run_verify(write_run(tmp_path / "cpu", cpu_tests, machine=cpu), tmp_path / "out-cpu")
    assert data["verified"] == [] and data["preference"] == [] and "Nothing verified" in text
    # on a GPU machine, CUDA kernels emulated on CPU tensors record where="cpu": they are not evidence
    data, text = run_verify(write_run(tmp_path / "emulated", cpu_tests), tmp_path / "out-emulated")
    assert data["verified"] == [] and "4 kernel calls off the run's GPU" in text


def test_benchmark_mismatches_and_memcheck_errors_unverify(tmp_path):
    results = [bench_result("max_pool2d a", "max_pool2d", "pytorch"),
               bench_result("max_pool2d a", "max_pool2d", "vk.triton", status="mismatch"),
               bench_result("max_pool2d a", "max_pool2d", "vk.torch", status="mismatch"),
               bench_result("model ViT", None, "pytorch"), bench_result("model ViT", None, "vk.cuda", status="error")]
    memcheck = [{"stage": "memcheck", "exit": verify.MEMCHECK_ERRORS, "seconds": 30, "budget": 40}]
    data, text = run_verify(write_run(tmp_path / "run", POOLING_TESTS, results, stages=memcheck), tmp_path / "out")
    assert records(data) == {("max_pool2d", "triton", "float16"), ("avg_pool2d", "triton", "bfloat16")}
    assert "| max_pool2d | torch |" not in text  # only kernel backends are judged
    assert "max_pool2d a: MISMATCH" in text and "model ViT: ERROR" in text and "memcheck found errors" in text


def test_a_new_run_replaces_what_it_judged_and_drops_records_of_changed_sources():
    old = {"op": "max_pool2d", "backend": "triton", "dtype": "bfloat16", "capability": "9.0", "family": "pooling", "sources": "a"}
    untested = {**old, "op": "avg_pool2d"}
    other_gpu = {**old, "capability": "8.0"}
    edited = {**old, "op": "adaptive_avg_pool2d", "sources": "stale"}
    data = {"about": verified.ABOUT, "verified": [old, untested, other_gpu, edited], "preference": []}
    tests = verify.Tests(family={"max_pool2d": "pooling"})
    failed = verify.Verdict("max_pool2d", "triton", "bfloat16", 3, ["failed: x"])
    machine = {**GPU_MACHINE, "sources": {"pooling": {"triton": "a"}}}
    updated = verify.updated_data(data, [failed], tests, [], machine, {"pooling": {"triton": "a"}})
    assert updated["verified"] == [untested, other_gpu]


def copy_of_sources(tmp_path: Path) -> tuple[Path, Path]:
    package = tmp_path / "vkernels"
    shutil.copytree(sources.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.json"))
    csrc = tmp_path / "csrc"
    shutil.copytree(sources.PACKAGE.parent / "csrc", csrc)
    return package, csrc


def hashes(package: Path, csrc: Path) -> dict:
    sources._imported_files.cache_clear()
    sources._schema_names_by_module.cache_clear()
    return sources.source_hashes(package, sources.cuda_source_hashes(csrc))


@pytest.mark.skipif(not (sources.PACKAGE.parent / "csrc").is_dir(), reason="needs the checkout's csrc/")
def test_editing_a_kernel_changes_its_family_hash_and_only_those_that_call_it(tmp_path):
    package, csrc = copy_of_sources(tmp_path)
    before = hashes(package, csrc)
    assert before == kernel_sources()  # the copy hashes as the checkout: paths are relative
    with open(package / "triton_kernels" / "attention.py", "a") as f:
        f.write("\n# edited\n")
    after = hashes(package, csrc)
    assert after["attention"]["triton"] != before["attention"]["triton"]
    assert after["attention"]["cuda"] == before["attention"]["cuda"]  # the CUDA kernels do not run Triton's
    assert {f: h for f, h in after.items() if f != "attention"} == {f: h for f, h in before.items() if f != "attention"}
    with open(csrc / "cuda" / "pooling.cu", "a") as f:
        f.write("\n// edited\n")
    edited = hashes(package, csrc)
    assert edited["pooling"]["cuda"] != after["pooling"]["cuda"]
    # conv2d_relu_maxpool2d's backward runs the pooling family's max_pool2d_backward
    assert edited["conv"]["cuda"] != after["conv"]["cuda"] and edited["attention"] == after["attention"]
    sources._imported_files.cache_clear()
    sources._schema_names_by_module.cache_clear()


def test_records_of_unknown_sources_never_count():
    record = {"op": "max_pool2d", "backend": "cuda", "dtype": "bfloat16", "capability": "9.0", "family": "pooling", "sources": None}
    data = {"about": verified.ABOUT, "verified": [record], "preference": []}
    assert verified.usable(data, lambda family, backend: None).verified == {}


def test_sections_go_below_the_marker_newest_first(tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(f"# Benchmarks\n\nhow\n\n{verify.BENCHMARKS_MARKER}\n\n## older run\n")
    verify.insert_section(benchmarks, "## newer run\n")
    assert benchmarks.read_text() == f"# Benchmarks\n\nhow\n\n{verify.BENCHMARKS_MARKER}\n\n## newer run\n\n## older run\n"
