"""Timing: CUDA events on GPUs, perf_counter on CPUs; median, min and IQR over repeats; and the
machine's two ceilings (device-to-device copy bandwidth, bf16 matmul rate) measured once per run."""
from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    iqr_ms: float  # interquartile range: the spread of the middle half of the repeats
    repeats: int


def summarize(times_ms: Sequence[float]) -> Timing:
    quartiles = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 3
    return Timing(statistics.median(times_ms), min(times_ms), quartiles[2] - quartiles[0], len(times_ms))


def input_set_count(set_bytes: int, device: torch.device) -> int:
    """How many input sets to rotate through so that a timed call does not find its inputs still in
    L2 from the previous one: enough sets to cover three times the L2 (1 when one set is larger)."""
    if device.type != "cuda":
        return 1
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(16, math.ceil(3 * l2_bytes / max(set_bytes, 1))))


def time_fn(fn: Callable, input_sets: Sequence, device: torch.device, quick: bool) -> Timing:
    """Time fn(inputs) over input_sets in rotation."""
    if device.type == "cuda":
        return _time_cuda(fn, input_sets, budget_ms=50 if quick else 200)
    return _time_cpu(fn, input_sets, repeats=3 if quick else 5)


def _time_cpu(fn: Callable, input_sets: Sequence, repeats: int) -> Timing:
    # No warm-up call: the callers' output check has run fn once already, and on a CPU every call
    # of an interpreted Triton kernel costs as much as the first.
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(input_sets[i % len(input_sets)])
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


@functools.cache
def _sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000)  # warm-up
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    return 1_000_000 / start.elapsed_time(end)


def _time_cuda(fn: Callable, input_sets: Sequence, budget_ms: float) -> Timing:
    """Events around each call. Before each call the GPU spins in a short sleep kernel, long enough
    for the host to enqueue the call: the events then time the kernels, not the host's launch cost
    (a Python op's dispatch can outlast a 20 µs kernel)."""
    for inputs in input_sets:  # warm-up: compilation, autotuning, allocator growth
        fn(inputs)
    torch.cuda.synchronize()

    probe = 5
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host_start = time.perf_counter()
    start.record()
    for i in range(probe):
        fn(input_sets[i % len(input_sets)])
    end.record()
    host_ms = (time.perf_counter() - host_start) * 1e3 / probe
    torch.cuda.synchronize()
    device_ms = start.elapsed_time(end) / probe
    repeats = max(10, min(1000, int(budget_ms / max(device_ms, 1e-3))))

    sleep_cycles = int(_sleep_cycles_per_ms() * (2 * host_ms + 0.02))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        torch.cuda._sleep(sleep_cycles)
        starts[i].record()
        fn(input_sets[i % len(input_sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written
    matmul_tflops: float | None  # bf16 8192³ on CUDA; None on CPU


def measure_ceilings(device: torch.device) -> Ceilings:
    # 1 GiB each way on a GPU (far past L2); 64 MiB on a CPU, which we do not tune for anyway.
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = time_fn(lambda _: target.copy_(source), [None], device, quick=False)
    del source, target
    matmul_tflops = None
    if device.type == "cuda":
        size = 8192
        a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
        matmul = time_fn(lambda _: a @ b, [None], device, quick=False)
        matmul_tflops = 2 * size**3 / (matmul.median_ms * 1e-3) / 1e12
    return Ceilings(copy_gbps=2 * nbytes / (copy.median_ms * 1e-3) / 1e9, matmul_tflops=matmul_tflops)
