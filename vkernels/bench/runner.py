"""Find the cases, check every implementation against stock PyTorch, then time it."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

from vkernels import BackendUnavailableError
from vkernels.bench.case import BASELINE, Case, Outputs
from vkernels.bench.timing import Ceilings, input_set_count, time_fn


@dataclass
class Result:
    case: str
    family: str
    direction: str
    impl: str
    status: str  # "ok", "mismatch" (timed, but its output differs), "error" or "skipped"
    note: str = ""  # the reason for skipped / error / mismatch
    rel_error: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    iqr_ms: float | None = None
    repeats: int | None = None
    gbps: float | None = None
    copy_fraction: float | None = None  # gbps over the measured device-to-device copy bandwidth
    tflops: float | None = None
    matmul_fraction: float | None = None  # tflops over the measured bf16 matmul rate (CUDA only)
    speedup: float | None = None  # BASELINE's median over this one's
    items_per_s: float | None = None  # case.items / median time
    peak_mib: float | None = None  # CUDA only: peak memory allocated during one call, above what was allocated before it
    op: str | None = None  # the case's public op, dtype and shape class (see Case)
    dtype: str | None = None
    shape_class: str | None = None


def import_module_cases(family: str, device: torch.device, max_autotune: bool = False) -> list[Case]:
    """cases(device, max_autotune) of vkernels.bench.cases.<family>."""
    return importlib.import_module(f"vkernels.bench.cases.{family}").cases(device, max_autotune)


def discover_cases(device: torch.device, max_autotune: bool = False) -> tuple[list[Case], list[str]]:
    """The cases of every module in vkernels.bench.cases, and the modules that failed."""
    from vkernels.bench import cases as package

    found, failures = [], []
    for module_info in pkgutil.iter_modules(package.__path__):
        try:
            found += import_module_cases(module_info.name, device, max_autotune)
        except Exception as error:  # one broken family must not hide the others' results
            failures.append(f"vkernels.bench.cases.{module_info.name}: {type(error).__name__}: {error}")
    return found, failures


def as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def relative_error(actual: Outputs, expected: Outputs) -> float:
    """Largest ‖actual − expected‖ / ‖expected‖ over the outputs, in float64; NaN gives inf."""
    worst = 0.0
    for got, want in zip(as_tuple(actual), as_tuple(expected), strict=True):
        if got.shape != want.shape:
            return float("inf")
        got, want = got.detach().double(), want.detach().double()
        if torch.isnan(got).any() or torch.isnan(want).any():
            return float("inf")
        worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    return worst


def short_error(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def peak_memory_mib(fn, inputs, device: torch.device) -> float:
    """Peak memory allocated during one call of fn(inputs), above what was allocated before it (the
    inputs, the model and other cases' leftovers are not counted): activations, workspaces, gradients."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(inputs)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_case(case: Case, device: torch.device, quick: bool, ceilings: Ceilings) -> list[Result]:
    """One Result per implementation, skipped ones included, BASELINE first."""
    torch._dynamo.reset()  # each case's torch.compile starts fresh (see case.compiled)
    names = [BASELINE] + [name for name in case.impls if name != BASELINE]

    def make_result(impl: str, status: str, note: str = "") -> Result:
        return Result(case.name, case.family, case.direction, impl, status, note,
                      op=case.op, dtype=case.dtype, shape_class=case.shape_class)

    results = {name: make_result(name, "ok") for name in names}

    # Correctness first, on fresh inputs: a fast wrong answer must not look like a win.
    inputs = case.make_inputs()
    expected = case.impls[BASELINE](inputs)
    for name in names[1:]:
        try:
            error = relative_error(case.impls[name](inputs), expected)
        except BackendUnavailableError as exception:  # available, but not for this input
            results[name].status, results[name].note = "skipped", str(exception)
            continue
        except Exception as exception:
            results[name].status, results[name].note = "error", short_error(exception)
            continue
        results[name].rel_error = error
        if not error <= case.tolerance:
            results[name].status = "mismatch"
            results[name].note = f"rel err {error:.2e} > {case.tolerance:.0e}"
    results[BASELINE].rel_error = 0.0
    del expected

    set_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
    input_sets = [inputs] + [case.make_inputs() for _ in range(input_set_count(set_bytes, device) - 1)]
    for name in names:
        result = results[name]
        if result.status in ("error", "skipped"):
            continue
        try:
            timing = time_fn(case.impls[name], input_sets, device, quick)
        except Exception as exception:
            result.status, result.note = "error", short_error(exception)
            continue
        result.median_ms, result.min_ms, result.iqr_ms, result.repeats = (
            timing.median_ms, timing.min_ms, timing.iqr_ms, timing.repeats)
        seconds = timing.median_ms * 1e-3
        if case.bytes_moved:
            result.gbps = case.bytes_moved / seconds / 1e9
            result.copy_fraction = result.gbps / ceilings.copy_gbps
        if case.flops:
            result.tflops = case.flops / seconds / 1e12
            if ceilings.matmul_tflops:
                result.matmul_fraction = result.tflops / ceilings.matmul_tflops
        if case.items:
            result.items_per_s = case.items / seconds
        if device.type == "cuda":
            result.peak_mib = peak_memory_mib(case.impls[name], inputs, device)
    del input_sets, inputs

    baseline_ms = results[BASELINE].median_ms
    for result in results.values():
        if result.median_ms and baseline_ms:
            result.speedup = baseline_ms / result.median_ms
    skipped = [make_result(name, "skipped", reason) for name, reason in case.skipped.items()]
    return list(results.values()) + skipped
