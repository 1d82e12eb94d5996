"""Benchmark cases, one module per op family, each with ``cases(device, quick) -> list[Case]``."""
