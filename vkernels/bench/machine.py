"""What a run ran on: device, GPU architecture, versions, commit, kernel sources, measured ceilings.

``python -m vkernels.bench.machine FILE`` measures the ceilings and writes this record as JSON
(bench/gpu_run.sh's first stage writes run.json, which ``python -m vkernels.verify`` reads: a run
whose record shows no real GPU verifies nothing). The benchmark results carry the same record.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from vkernels.bench.timing import Ceilings

ROOT = Path(__file__).resolve().parents[2]  # the checkout, when vkernels runs from one


def commit() -> str:
    """$VKERNELS_COMMIT, else the checkout's git HEAD (+ "-dirty" with uncommitted changes), else "unknown"."""
    if os.environ.get("VKERNELS_COMMIT"):
        return os.environ["VKERNELS_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def kernel_sources() -> dict[str, dict[str, str | None]]:
    """family -> backend -> vkernels.sources hash of the code this process runs: the CUDA sources
    from csrc/ in a checkout (the build compiles those), else from the built vkernels._C."""
    from vkernels import dispatch, sources

    csrc = ROOT / "csrc"
    cuda = sources.cuda_source_hashes(csrc) if (csrc / "cuda").is_dir() else dispatch._built_cuda_source_hashes()
    return sources.source_hashes(cuda_hashes=cuda)


def describe(device: torch.device, ceilings: Ceilings, command: str, title_suffix: str = "") -> dict:
    import triton

    import vkernels

    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "title": (f"{name}{title_suffix}" if on_gpu
                  else f"CPU run{title_suffix} (no GPU: a check that the paths run, not a performance claim)"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "gpu": on_gpu,
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)) if on_gpu else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
        "command": command,
        "copy_gbps": ceilings.copy_gbps,
        "matmul_tflops": ceilings.matmul_tflops,
        "backends": {name: f"{'available' if s.available else 'UNAVAILABLE'} ({s.reason})"
                     for name, s in vkernels.backends().items()},
        "sources": kernel_sources(),
    }


def reexec_with_triton_interpreter_if_no_gpu() -> None:
    """Triton reads TRITON_INTERPRET when it is imported and when kernels are decorated, which
    `python -m vkernels.bench...` has done before this runs; so restart the process with it set."""
    if "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        return
    print("vkernels.bench: no GPU here; restarting with TRITON_INTERPRET=1 so that the Triton backend "
          "runs on CPU tensors", flush=True)
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "TRITON_INTERPRET": "1"})


def main() -> None:
    import argparse

    from vkernels.bench.report import machine_lines
    from vkernels.bench.timing import measure_ceilings

    parser = argparse.ArgumentParser(prog="python -m vkernels.bench.machine", description=__doc__.split("\n\n")[1])
    parser.add_argument("file", type=Path, help="where the JSON record goes")
    parser.add_argument("--command", default="bash bench/gpu_run.sh", help="the run's command, for the record")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = describe(device, measure_ceilings(device), args.command)
    args.file.parent.mkdir(parents=True, exist_ok=True)
    args.file.write_text(json.dumps(machine, indent=1))
    print("\n".join(machine_lines(machine)))


if __name__ == "__main__":
    reexec_with_triton_interpreter_if_no_gpu()
    main()
