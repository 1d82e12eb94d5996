"""python -m vkernels.bench [--out DIR] [--quick] [--only PATTERN] [--headline] [--no-compile] [--merge] [--max-autotune]

Prints, for every op family in vkernels.bench.cases, a table of the vkernels backends against stock
PyTorch on this machine, and writes results.json, results.md and speedup.png (with matplotlib) into DIR.
Exit status 1 when an implementation errs or disagrees with PyTorch, or a case module fails.
"""
import sys

from vkernels.bench.machine import reexec_with_triton_interpreter_if_no_gpu


def main() -> int:
    import argparse
    import re
    import shlex
    from pathlib import Path

    import torch

    from vkernels.bench.machine import describe
    from vkernels.bench.report import IMPLS_LEGEND, earlier_results, format_table, machine_lines, result_problems, write_outputs
    from vkernels.bench.runner import discover_cases, run_case, short_error
    from vkernels.bench.timing import measure_ceilings

    parser = argparse.ArgumentParser(prog="python -m vkernels.bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where results go (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", metavar="PATTERN", help="only cases whose name matches this regular expression")
    parser.add_argument("--headline", action="store_true",
                        help="only the anchor shapes of the README's targets, one per op and shape class")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile implementations (they compile per case)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cases already in DIR/results.json and run only the others")
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
    command = shlex.join(["python", "-m", "vkernels.bench", *sys.argv[1:]])
    machine = describe(device, ceilings, command, " --quick" if args.quick else "")
    print("\n".join(machine_lines(machine)), flush=True)

    cases, problems = discover_cases(device, args.max_autotune)
    if args.only:
        cases = [case for case in cases if re.search(args.only, case.name, re.IGNORECASE)]
    if args.headline:
        cases = [case for case in cases if case.headline]
    if args.no_compile:
        for case in cases:
            for name in [name for name in case.impls if name.startswith("torch.compile")]:
                del case.impls[name]
                case.skipped[name] = "not timed in this run (--no-compile)"
    earlier = earlier_results(args.out) if args.merge else None
    results = []
    if earlier is not None:
        cases = [case for case in cases if case.name not in {result.case for result in earlier.results}]
        machine = earlier.machine | {"command": f"{earlier.machine['command']}; {command}"}
        problems, results = earlier.problems + problems, earlier.results
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.name}", flush=True)
        try:
            results += run_case(case, device, args.quick, ceilings)
        except Exception as error:  # the baseline itself failed: the case is broken
            problems.append(f"{case.name}: {short_error(error)}")
        write_outputs(args.out, machine, results, problems, earlier, chart=False)  # survives a kill mid-run
    problems += result_problems(results)

    print(f"\n{IMPLS_LEGEND}\n\n{format_table(results)}\n")
    for path in write_outputs(args.out, machine, results, problems, earlier):
        print(f"wrote {path}")
    if problems:
        print(f"\n!!! {len(problems)} problem(s):", *problems, sep="\n  ")
    return 1 if problems else 0


if __name__ == "__main__":
    reexec_with_triton_interpreter_if_no_gpu()
    sys.exit(main())
