"""python -m vkernels.verify RUN_DIR [--out DIR]: a GPU run becomes vkernels' verification data.

RUN_DIR holds what bench/gpu_run.sh leaves in $OUT: ``run.json`` (python -m vkernels.bench.machine:
the GPU, versions, commit, kernel source hashes), ``stages.jsonl`` (each stage's exit status, time and
budget), ``junit.xml`` (the tests; each test case names the kernels it ran, see tests/conftest.py)
and ``results.json`` (python -m vkernels.bench: checks against PyTorch, timings, autotuner picks,
first-call latencies). Any of them may be missing from a run cut short.

- A run without a real GPU verifies nothing: run.json must show a CUDA device, and a test counts only
  the kernels it ran on CUDA tensors of that device's compute capability (emulated CUDA kernels run
  on CPU tensors, so they never count).
- A public op, kernel backend and dtype is verified on that compute capability when at least one test
  ran it there and passed, and nothing counts against it: a failing or erroring test that ran it; a
  failing test that recorded no kernel at all (it failed before its first call, called launchers
  directly, or its process died) counts against every op and dtype of each backend its test id
  names ("triton", "cuda"); a MISMATCH or ERROR of that backend in a benchmark case of the op and
  dtype (any op, for a whole-model case); for cuda, errors found by compute-sanitizer memcheck.
- What the run did not test keeps its earlier record. Records whose kernel sources no longer hash as
  in this checkout are dropped: they do not describe this code.
- The benchmarks give the preference order per op, dtype and shape class (vkernels/verified.py), and
  the autotuner's picks become the shipped Triton configs for the GPU's compute capability, except
  those of a family with a MISMATCH or ERROR.

Writes vkernels/verified.json, vkernels/tuned_configs.json and a section of BENCHMARKS.md (newest
first) in the checkout vkernels runs from; with ``--out DIR``, verified.json, tuned_configs.json and
benchmarks.md (the section alone) into DIR instead.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from vkernels import verified
from vkernels.bench.report import machine_lines, results_markdown
from vkernels.bench.runner import Result
from vkernels.dispatch import KERNEL_BACKENDS
from vkernels.triton_kernels import autotuning

KERNELS_PROPERTY = "vkernels_kernels"  # the junit property tests/conftest.py records
MEMCHECK_ERRORS = 86  # compute-sanitizer's exit status in bench/gpu_run.sh when memcheck finds errors
BENCHMARKS_MARKER = "<!-- python -m vkernels.verify inserts each run's section below, newest first -->"
Triple = tuple[str, str, str]  # (op, backend, dtype)


@dataclass
class Tests:
    """What the junit files say about the kernels, on the run's GPU."""
    passed: Counter = field(default_factory=Counter)  # Triple -> tests that ran it and passed
    failed: dict[Triple, list[str]] = field(default_factory=lambda: defaultdict(list))  # Triple -> failing test ids
    family: dict[str, str] = field(default_factory=dict)  # op -> its family (vkernels/ops/<family>.py)
    unattributed: list[tuple[str, set[str]]] = field(default_factory=list)  # failing test ids, the backends they name
    elsewhere: int = 0  # kernel calls that did not run on the run's GPU (CPU tensors, emulation, another GPU)
    totals: Counter = field(default_factory=Counter)  # passed / failed / skipped / out of time


def read_tests(junit_files: list[Path], capability: str | None) -> Tests:
    tests = Tests()
    for path in junit_files:
        for case in ElementTree.parse(path).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped")
            if not failed and skipped is not None:
                tests.totals["out of time" if "out of time" in (skipped.get("message") or "") else "skipped"] += 1
                continue
            tests.totals["failed" if failed else "passed"] += 1
            kernels = [json.loads(p.get("value")) for p in case.iter("property") if p.get("name") == KERNELS_PROPERTY]
            calls = [call for calls in kernels for call in calls]
            here = [call for call in calls if call["where"] == capability]
            tests.elsewhere += len(calls) - len(here)
            for call in here:
                triple = (call["op"], call["backend"], call["dtype"])
                tests.family[call["op"]] = call["family"]
                if failed:
                    tests.failed[triple].append(test_id)
                else:
                    tests.passed[triple] += 1
            if failed and not calls:
                tests.unattributed.append((test_id, set(re.split(r"[^A-Za-z0-9]+", test_id)) & set(KERNEL_BACKENDS)))
    return tests


def bench_objections(results: list[Result]) -> dict[tuple[str | None, str, str], list[str]]:
    """(op, backend, dtype) -> the benchmark cases where that backend erred or disagreed with
    PyTorch; op None for a whole-model case."""
    objections = defaultdict(list)
    for result in results:
        backend = result.impl.removeprefix("vk.")
        if result.status in ("mismatch", "error") and backend in KERNEL_BACKENDS:
            objections[(result.op, backend, result.dtype)].append(f"{result.case}: {result.status.upper()}")
    return objections


@dataclass
class Verdict:
    op: str
    backend: str
    dtype: str
    passed: int
    against: list[str]  # why not, empty when verified

    @property
    def verified(self) -> bool:
        return not self.against


def verdicts(tests: Tests, results: list[Result], stages: dict[str, dict], machine: dict) -> list[Verdict]:
    """One verdict per (op, backend, dtype) the run's tests or benchmarks ran on its GPU."""
    objections = bench_objections(results)
    memcheck_errors = stages.get("memcheck", {}).get("exit") == MEMCHECK_ERRORS
    found = []
    for triple in sorted(set(tests.passed) | set(tests.failed) | {t for t in objections if t[0] is not None}):
        op, backend, dtype = triple
        against = [] if tests.passed[triple] else ["no passing test ran it"]
        against += [f"failed: {test_id}" for test_id in tests.failed.get(triple, [])[:3]]
        against += [f"failed without recording a kernel: {test_id}" for test_id, named in tests.unattributed if backend in named][:3]
        against += objections.get(triple, []) + objections.get((None, backend, dtype), [])
        if backend == "cuda" and memcheck_errors:
            against.append("compute-sanitizer memcheck found errors")
        if "emulat" in machine["backends"].get(backend, ""):
            against.append("the backend was emulated")
        found.append(Verdict(op, backend, dtype, tests.passed[triple], against))
    return found


def preference_records(results: list[Result], machine: dict) -> list[dict]:
    """One record per op, dtype and shape class the benchmarks timed (see vkernels/verified.py)."""
    by_case = defaultdict(dict)
    for result in results:
        if result.op is not None:
            by_case[(result.op, result.dtype, result.shape_class, result.case)][result.impl] = result
    groups = defaultdict(list)
    for (op, dtype, shape_class, _), impls in by_case.items():
        groups[(op, dtype, shape_class)].append(impls)
    records = []
    for (op, dtype, shape_class), cases in sorted(groups.items()):
        speedup = {}
        for backend in KERNEL_BACKENDS:
            timed = [impls.get(f"vk.{backend}") for impls in cases]
            if all(r is not None and r.status == "ok" and r.speedup for r in timed):
                speedup[backend] = round(math.exp(sum(math.log(r.speedup) for r in timed) / len(timed)), 3)
        ranked = sorted(speedup, key=speedup.get, reverse=True)
        order = [b for b in ranked if speedup[b] > 1] + ["torch"] + [b for b in ranked if speedup[b] <= 1]
        records.append({"op": op, "dtype": dtype, "shape_class": shape_class, "capability": machine["capability"],
                        "order": order, "speedup": speedup, "cases": len(cases), "gpu": machine["device"],
                        "date": machine["date"]})
    return records


def updated_data(data: dict, found: list[Verdict], tests: Tests, preference: list[dict], machine: dict,
                 current: dict[str, dict[str, str | None]]) -> dict:
    """``data`` (a verified.json) with this run's verdicts and preference orders for its GPU; records
    whose sources differ from ``current`` (family -> backend -> this checkout's source hash) dropped."""
    capability = machine["capability"]
    judged = {(v.op, v.backend, v.dtype) for v in found}
    kept = [r for r in data["verified"] if not (r["capability"] == capability and (r["op"], r["backend"], r["dtype"]) in judged)]
    for verdict in found:
        family = tests.family.get(verdict.op)
        if verdict.verified and machine["sources"].get(family, {}).get(verdict.backend):
            kept.append({"op": verdict.op, "backend": verdict.backend, "dtype": verdict.dtype, "capability": capability,
                         "family": family, "sources": machine["sources"].get(family, {}).get(verdict.backend),
                         "gpu": machine["device"], "date": machine["date"], "torch": machine["torch"],
                         "triton": machine["triton"], "cuda": machine["cuda"], "commit": machine["commit"],
                         "tests": {"passed": verdict.passed}})
    fresh = [r for r in kept if current.get(r["family"], {}).get(r["backend"]) in (None, r["sources"])]
    measured = {(p["capability"], p["op"], p["dtype"], p["shape_class"]) for p in preference}
    others = [p for p in data["preference"] if (p["capability"], p["op"], p["dtype"], p["shape_class"]) not in measured]
    return {"about": verified.ABOUT, "verified": fresh, "preference": others + preference}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def section(machine: dict, stages: dict[str, dict], tests: Tests, found: list[Verdict], preference: list[dict],
            bench: dict, refusal: str | None, stale: list[str]) -> str:
    """The run's BENCHMARKS.md section: header, verification, preference, first calls, the tables unedited."""
    kind = f"GPU run, compute capability {machine['capability']}" if machine.get("gpu") else "verifies nothing"
    lines = [f"## {machine['title']} ({kind})", "", *machine_lines(machine)]
    if stages:
        lines.append("- stages (exit status, seconds of budget): " + ", ".join(
            f"{name} {s['exit']} ({s['seconds']} of {s['budget']})" for name, s in stages.items()))
    totals = tests.totals
    lines += [f"- tests: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped, "
              f"{totals['out of time']} not run (out of time); {tests.elsewhere} kernel calls off the run's GPU "
              "(CPU tensors, emulation) do not count", ""]
    if refusal:
        lines += [f"**Nothing verified:** {refusal}", ""]
    else:
        lines += [f"**Verification** (compute capability {machine['capability']}; `auto` may pick what passed):", "",
                  _table(["op", "backend", "dtype", "tests passed", "verdict"],
                         [[v.op, v.backend, v.dtype, str(v.passed), "verified" if v.verified else "NOT verified: " + "; ".join(v.against)]
                          for v in found]), ""]
        if stale:
            lines += ["Not recorded, kernel sources changed since the run: " + ", ".join(stale), ""]
        if preference:
            lines += ["**Preference** (geometric mean of speed-ups over stock PyTorch per op, dtype and shape class):", "",
                      _table(["op", "dtype", "shape class", "order", "speed-ups"],
                             [[p["op"], p["dtype"], p["shape_class"], " > ".join(p["order"]),
                               ", ".join(f"{b} {x:.2f}×" for b, x in p["speedup"].items())] for p in preference]), ""]
    if bench.get("first_call"):
        lines += ["**First call** (fresh process and Triton cache, so compiling, and autotuning without shipped "
                  "configs, included; second call after it):", "",
                  _table(["op", "case", "configs", "first call", "second call"],
                         [[c["op"], c["case"], c["configs"], f"{c['first_s']:.2f} s", f"{c['second_s'] * 1e3:.1f} ms"]
                          for c in bench["first_call"]]), ""]
    if bench:
        results = [Result(**r) for r in bench["results"]]
        lines.append(results_markdown(results, bench["problems"], bench.get("autotuned", [])))
    return "\n".join(lines).rstrip() + "\n"


def insert_section(benchmarks: Path, text: str) -> None:
    content = benchmarks.read_text() if benchmarks.exists() else f"# Benchmarks\n\n{BENCHMARKS_MARKER}\n"
    if BENCHMARKS_MARKER not in content:
        content = content.rstrip() + f"\n\n{BENCHMARKS_MARKER}\n"
    before, after = content.split(BENCHMARKS_MARKER, 1)
    older = after.lstrip("\n")
    benchmarks.write_text(f"{before}{BENCHMARKS_MARKER}\n\n{text.rstrip()}\n" + (f"\n{older}" if older else ""))


def refusal_reason(machine: dict, tests_found: bool) -> str | None:
    if not machine.get("gpu") or not machine.get("capability"):
        return f"the run had no CUDA GPU ({machine.get('device')})"
    if not tests_found:
        return "the run left no test results (junit.xml): it ended before its test stage finished"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vkernels.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a GPU run's $OUT (bench/gpu_run.sh)")
    parser.add_argument("--out", type=Path, help="write verified.json, tuned_configs.json and benchmarks.md here "
                        "instead of into the checkout")
    args = parser.parse_args(argv)
    run = args.run_dir
    if not (run / "run.json").exists():
        print(f"{run}/run.json is missing: not a run of bench/gpu_run.sh", file=sys.stderr)
        return 2
    machine = json.loads((run / "run.json").read_text())
    stages = {}
    if (run / "stages.jsonl").exists():
        stages = {s["stage"]: s for s in map(json.loads, (run / "stages.jsonl").read_text().splitlines()) if s}
    bench = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    results = [Result(**r) for r in bench.get("results", [])]
    junit_files = sorted(run.glob("*.xml"))
    tests = read_tests(junit_files, machine.get("capability"))
    refusal = refusal_reason(machine, bool(junit_files))

    data = verified.load()
    configs_file = autotuning.CONFIGS_FILE
    shipped = json.loads(configs_file.read_text()) if configs_file.exists() else {}
    found, preference, stale = [], [], []
    if refusal is None:
        found = verdicts(tests, results, stages, machine)
        preference = preference_records(results, machine)
        from vkernels.bench.machine import kernel_sources

        data = updated_data(data, found, tests, preference, machine, kernel_sources())
        recorded = {(r["op"], r["backend"], r["dtype"]) for r in data["verified"] if r["capability"] == machine["capability"]}
        stale = [f"{v.op}/{v.backend}/{v.dtype}" for v in found if v.verified and (v.op, v.backend, v.dtype) not in recorded]
        objecting = {r.family for r in results if r.status in ("mismatch", "error") and r.impl == "vk.triton"}
        picks = [] if "models" in objecting else [p for p in bench.get("autotuned", []) if p["family"] not in objecting]
        shipped = autotuning.ship(shipped, picks, machine["capability"], machine)

    text = section(machine, stages, tests, found, preference, bench, refusal, stale)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = (args.out / "verified.json", args.out / "tuned_configs.json", args.out / "benchmarks.md")
        paths[2].write_text(text)
    else:
        from vkernels.bench.machine import ROOT

        paths = (verified.DATA_FILE, configs_file, ROOT / "BENCHMARKS.md")
        insert_section(paths[2], text)
    verified.dump(data, paths[0])
    paths[1].write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n")
    print(text)
    print("\n".join(f"wrote {path}" for path in paths))
    count = sum(v.verified for v in found) - len(stale)
    print(f"verified by this run: {count} (op, backend, dtype) on compute capability {machine.get('capability')}"
          if refusal is None else f"verified by this run: nothing ({refusal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
