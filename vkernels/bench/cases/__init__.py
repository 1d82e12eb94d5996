"""Benchmark cases, one module per op family, each with ``cases(device, max_autotune) -> list[Case]``
(max_autotune: also time stock PyTorch under ``torch.compile(mode="max-autotune")`` where an issue
compares against it; that autotunes for minutes)."""
