"""Benchmarks of every vkernels backend against stock PyTorch: ``python -m vkernels.bench``.

Each module in ``vkernels.bench.cases`` exposes ``cases(device, max_autotune) -> list[Case]``; the harness
and the pytest-benchmark suite in ``bench/`` find them with pkgutil, so an op family adds itself by
adding a module there.
"""
from vkernels.bench.case import BASELINE, Case
from vkernels.bench.runner import Result, discover_cases, relative_error, run_case
from vkernels.bench.timing import Timing, input_set_count, measure_ceilings, time_fn

__all__ = ["BASELINE", "Case", "Result", "Timing", "discover_cases", "input_set_count", "measure_ceilings",
           "relative_error", "run_case", "time_fn"]
