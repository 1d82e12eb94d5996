"""python -m vkernels.bench [--out DIR] [--quick] [--only PATTERN] [--max-autotune]

Prints, for every op family in vkernels.bench.cases, a table of the vkernels backends against stock
PyTorch on this machine, and writes results.json, results.md and speedup.png into DIR.
Exit status 1 when an implementation errs or disagrees with PyTorch, or a case module fails.
"""
import os
import sys


def reexec_with_triton_interpreter_if_no_gpu() -> None:
    """Triton reads TRITON_INTERPRET when it is imported and when kernels are decorated, which
    `python -m vkernels.bench` has done before this runs; so restart the process with it set."""
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    print("vkernels.bench: no GPU here; restarting with TRITON_INTERPRET=1 so that the Triton backend "
          "runs on CPU tensors", flush=True)
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "TRITON_INTERPRET": "1"})


def main() -> int:
    import argparse
    import datetime
    import platform
    import re
    import shlex
    from pathlib import Path

    import torch
    import triton

    import vkernels
    from vkernels.bench.report import IMPLS_LEGEND, format_table, machine_lines, write_outputs
    from vkernels.bench.runner import discover_cases, run_case, short_error
    from vkernels.bench.timing import measure_ceilings

    parser = argparse.ArgumentParser(prog="python -m vkernels.bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where results go (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", metavar="PATTERN", help="only cases whose name matches this regular expression")
    parser.add_argument("--max-autotune", action="store_true",
                        help="on a GPU, also time torch.compile(mode='max-autotune') where an issue compares "
                             "against it (conv forward); it autotunes for a minute or more per case")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny inputs on a shared machine: intra-op threads only add wake-up noise.
        torch.set_num_threads(1)
        print("NOTE: this machine has no GPU. Timing the CPU paths at small fp32 sizes, one thread (the "
              "Triton backend through its interpreter): a check that everything runs, not a performance number.")
    ceilings = measure_ceilings(device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    machine = {
        "title": (f"{device_name}{' --quick' if args.quick else ''}" if device.type == "cuda"
                  else f"CPU run{' --quick' if args.quick else ''} (no GPU: a check that the paths run, not a performance claim)"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": shlex.join(["python", "-m", "vkernels.bench", *sys.argv[1:]]),
        "copy_gbps": ceilings.copy_gbps,
        "matmul_tflops": ceilings.matmul_tflops,
        "backends": {name: f"{'available' if s.available else 'UNAVAILABLE'} ({s.reason})"
                     for name, s in vkernels.backends().items()},
    }
    print("\n".join(machine_lines(machine)), flush=True)

    cases, problems = discover_cases(device, args.max_autotune)
    if args.only:
        cases = [case for case in cases if re.search(args.only, case.name, re.IGNORECASE)]
    results = []
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.name}", flush=True)
        try:
            results += run_case(case, device, args.quick, ceilings)
        except Exception as error:  # the baseline itself failed: the case is broken
            problems.append(f"{case.name}: {short_error(error)}")
        write_outputs(args.out, machine, results, problems, chart=False)  # survives a kill mid-run
    problems += [f"{r.case} [{r.impl}]: {r.status.upper()} {r.note}" for r in results if r.status in ("mismatch", "error")]

    print(f"\n{IMPLS_LEGEND}\n\n{format_table(results)}\n")
    for path in write_outputs(args.out, machine, results, problems):
        print(f"wrote {path}")
    if problems:
        print(f"\n!!! {len(problems)} problem(s):", *problems, sep="\n  ")
    return 1 if problems else 0


if __name__ == "__main__":
    reexec_with_triton_interpreter_if_no_gpu()
    sys.exit(main())
