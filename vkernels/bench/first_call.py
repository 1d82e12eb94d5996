"""First-call latency, compile included: ``python -m vkernels.bench.first_call RESULTS_JSON``.

For the Triton forward of each op among the headline cases, times the first call in a fresh process
with an empty Triton cache (so it compiles, and autotunes where nothing is shipped) and the second
call, twice: with shipped configs (vkernels/tuned_configs.json plus the picks of the run's benchmarks
in RESULTS_JSON, as ``python -m vkernels.verify`` would ship them) and with none
(``VKERNELS_TUNED_CONFIGS=0``: every candidate config is compiled and benchmarked). Each result is
added to RESULTS_JSON under "first_call" as it comes, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_first_calls(family: str, case_name: str, impl: str) -> dict:
    """In this process: the first and the second call of one implementation of one case."""
    import torch

    from vkernels.bench.runner import import_module_cases

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = next(case for case in import_module_cases(family, device) if case.name == case_name)
    inputs = case.make_inputs()
    seconds = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        case.impls[impl](inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"first_s": seconds[0], "second_s": seconds[1]}


def shipped_with_run_picks(results: dict, scratch: Path) -> Path:
    """A tuned_configs file: the package's, plus the run's autotuned picks for its GPU."""
    from vkernels.triton_kernels.autotuning import CONFIGS_FILE, ship

    shipped = json.loads(CONFIGS_FILE.read_text()) if CONFIGS_FILE.exists() else {}
    machine = results["machine"]
    if machine.get("capability"):
        shipped = ship(shipped, results.get("autotuned", []), machine["capability"], machine)
    path = scratch / "tuned_configs.json"
    path.write_text(json.dumps(shipped))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vkernels.bench.first_call", description=__doc__.split("\n\n")[1])
    parser.add_argument("results", type=Path, help="a results.json of python -m vkernels.bench (gets a 'first_call' list)")
    parser.add_argument("--ops", type=int, default=None, help="at most this many ops (the first in the results)")
    parser.add_argument("--child", nargs=3, metavar=("FAMILY", "CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_first_calls(*args.child)))
        return

    results = json.loads(args.results.read_text())
    # one case per op: the first forward headline case that has a Triton implementation
    cases = {}
    for result in results["results"]:
        if result["direction"] == "fwd" and result["impl"] == "vk.triton" and result["op"] and result["status"] == "ok":
            cases.setdefault(result["op"], result)
    cases = dict(list(cases.items())[:args.ops])
    measured = results.setdefault("first_call", [])
    with tempfile.TemporaryDirectory() as scratch:
        configs = {"shipped": str(shipped_with_run_picks(results, Path(scratch))), "none": "0"}
        for op, result in cases.items():
            for label, tuned in configs.items():
                env = dict(os.environ, VKERNELS_TUNED_CONFIGS=tuned, TRITON_CACHE_DIR=tempfile.mkdtemp(dir=scratch))
                env.pop("VKERNELS_TRITON_AUTOTUNE_CONFIGS", None)  # what a user gets: every candidate
                child = subprocess.run([sys.executable, "-m", "vkernels.bench.first_call", str(args.results), "--child",
                                        result["family"], result["case"], "vk.triton"], env=env, capture_output=True, text=True)
                if child.returncode != 0:
                    print(child.stderr[-2000:], file=sys.stderr)
                    continue
                times = json.loads(child.stdout.strip().splitlines()[-1])
                measured.append({"op": op, "case": result["case"], "impl": "vk.triton", "configs": label, **times})
                print(f"first call of {op} ({result['case']}), {label} configs: {times['first_s']:.2f} s "
                      f"(second call {times['second_s'] * 1e3:.1f} ms)", flush=True)
                args.results.write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    from vkernels.bench.machine import reexec_with_triton_interpreter_if_no_gpu

    reexec_with_triton_interpreter_if_no_gpu()
    main()
