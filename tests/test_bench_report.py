"""The benchmark report: what it writes besides the timings."""
import json

import triton

from vkernels.bench import report
from vkernels.triton_kernels import conv

MACHINE = {"title": "test", "date": "today", "device": "CPU", "python": "3", "torch": "2", "triton": "3",
           "command": "python -m vkernels.bench", "copy_gbps": 1.0, "matmul_tflops": None, "backends": {}}


def test_autotuner_picks_are_written(tmp_path, monkeypatch):
    picked = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3)
    monkeypatch.setattr(conv._conv2d_implicit_gemm_kernel, "cache", {(56, 56, "torch.bfloat16"): picked})
    report.write_outputs(tmp_path, MACHINE, [], [], chart=False)
    (entry,) = json.loads((tmp_path / "results.json").read_text())["autotuned"]
    assert entry == {"kernel": "_conv2d_implicit_gemm_kernel", "key": "(56, 56, 'torch.bfloat16')",
                     "config": str(picked)}
    assert f"`_conv2d_implicit_gemm_kernel` (56, 56, 'torch.bfloat16'): {picked}" in (tmp_path / "results.md").read_text()
