"""Every case of vkernels.bench × every implementation, timed by pytest-benchmark.

The shapes live in vkernels/bench/cases/ (shared with ``python -m vkernels.bench``). Each test
checks the implementation against stock PyTorch before timing it.
"""
import itertools

import pytest
import torch

from vkernels import BackendUnavailableError
from vkernels.bench import BASELINE, discover_cases, input_set_count, measure_ceilings, relative_error, time_fn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES, BROKEN_CASE_MODULES = discover_cases(DEVICE)
# Host-timed rounds per test; the device times in extra_info come from time_fn's own repeats.
ROUNDS = 30 if DEVICE.type == "cuda" else 3


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def ceilings():
    return measure_ceilings(DEVICE)


if BROKEN_CASE_MODULES:  # (skipped by --benchmark-only unless it asks for the fixture)

    @pytest.mark.parametrize("failure", BROKEN_CASE_MODULES)
    def test_case_module_imports(benchmark, failure):
        pytest.fail(failure)


@pytest.mark.parametrize(
    ("case", "impl"),
    [pytest.param(case, impl, id=f"{case.name.replace(' ', '-')}-{impl}")
     for case in CASES for impl in [*case.impls, *case.skipped]],
)
def test_benchmark(benchmark, ceilings, case, impl):
    if impl in case.skipped:
        pytest.skip(f"{impl}: {case.skipped[impl]}")
    torch._dynamo.reset()  # a fresh torch.compile per case, as in the harness
    run = case.impls[impl]
    inputs = case.make_inputs()
    try:
        error = relative_error(run(inputs), case.impls[BASELINE](inputs))
    except BackendUnavailableError as unavailable:
        pytest.skip(str(unavailable))
    if not error <= case.tolerance:  # NaN fails too
        pytest.fail(f"{impl} disagrees with stock PyTorch: relative error {error:.2e} > {case.tolerance:.0e}", pytrace=False)

    set_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
    input_sets = [inputs] + [case.make_inputs() for _ in range(input_set_count(set_bytes, DEVICE) - 1)]
    device_timing = time_fn(run, input_sets, DEVICE, quick=True)

    rotation = itertools.cycle(input_sets)

    def next_inputs():
        synchronize()  # no earlier work may spill into the timed call
        return (next(rotation),), {}

    def synchronized_run(inputs):
        run(inputs)
        synchronize()

    benchmark.pedantic(synchronized_run, setup=next_inputs, rounds=ROUNDS, warmup_rounds=1)

    seconds = device_timing.median_ms * 1e-3
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        case=case.name,
        impl=impl,
        direction=case.direction,
        relative_error=error,
        timer="CUDA events around the call" if DEVICE.type == "cuda" else "perf_counter",
        median_ms=device_timing.median_ms,
        min_ms=device_timing.min_ms,
        iqr_ms=device_timing.iqr_ms,
        copy_gbps=ceilings.copy_gbps,
    )
    if case.bytes_moved:
        gbps = case.bytes_moved / seconds / 1e9
        benchmark.extra_info.update(gbps=gbps, copy_fraction=gbps / ceilings.copy_gbps)
    if case.flops:
        benchmark.extra_info.update(tflops=case.flops / seconds / 1e12)
