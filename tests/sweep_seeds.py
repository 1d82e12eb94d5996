"""Run tests over many seeds and list each failure with the seed that replays it.

    python tests/sweep_seeds.py --seeds 30 [--start S] [pytest arguments, e.g. tests/test_patch.py -k resnet]

One pytest run per seed, one after another (the machine's cores go to each run), with
VKERNELS_TEST_SEED set: the seed conftest.py otherwise draws at random. Seeds are drawn at random, or
are S, S+1, ... with --start. A failure prints as `VKERNELS_TEST_SEED=<seed> python -m pytest <test>`,
the line that replays it. The exit status is 1 when any run failed.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time

SUMMARY = re.compile(r"^=* ?(\d+ (passed|failed|skipped|error|errors|deselected)\b.*?) ?=*$")


def run_seed(seed: int, pytest_args: list[str]) -> tuple[list[str], str]:
    """Failed test ids (or the run's tail when pytest failed before any test) and the summary line."""
    env = {**os.environ, "VKERNELS_TEST_SEED": str(seed)}
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *pytest_args]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = run.stdout.splitlines()
    failed = [line.split(" ")[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    summary = next((m.group(1) for line in reversed(lines) if (m := SUMMARY.match(line))), "")
    if run.returncode not in (0, 1) or (run.returncode == 1 and not failed):  # usage, collection or internal error
        failed = [f"<pytest exit status {run.returncode}>\n" + "\n".join((run.stdout + run.stderr).splitlines()[-20:])]
    return failed, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=30, help="how many seeds (default 30)")
    parser.add_argument("--start", type=int, help="run seeds START, START+1, ... instead of random ones")
    args, pytest_args = parser.parse_known_args()
    seeds = (range(args.start, args.start + args.seeds) if args.start is not None
             else [random.randrange(2**31) for _ in range(args.seeds)])
    failures = []
    started = time.monotonic()
    for index, seed in enumerate(seeds, 1):
        seed_started = time.monotonic()
        failed, summary = run_seed(seed, pytest_args or ["tests"])
        print(f"[{index}/{args.seeds}] VKERNELS_TEST_SEED={seed}: {summary} ({time.monotonic() - seed_started:.0f} s)",
              flush=True)
        failures += [(seed, test) for test in failed]
    print(f"\n{args.seeds} seeds in {time.monotonic() - started:.0f} s, {len(failures)} failures")
    for seed, test in failures:
        print(f"VKERNELS_TEST_SEED={seed} python -m pytest {test}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
