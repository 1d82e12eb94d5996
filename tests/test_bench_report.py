"""The benchmark report: what it writes besides the timings, and without matplotlib."""
import json
import sys

import triton

from vkernels.bench import report
from vkernels.bench.runner import Result
from vkernels.triton_kernels import autotuning, conv

MACHINE = {"title": "test", "date": "today", "device": "CPU", "python": "3", "torch": "2", "triton": "3",
           "command": "python -m vkernels.bench", "copy_gbps": 1.0, "matmul_tflops": None, "backends": {}}


def test_autotuner_picks_are_written(tmp_path, monkeypatch):
    picked = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3)
    key, fields = (56, 56, "torch.bfloat16"), {"SRC_H": 56, "SRC_W": 56, "src_ptr.dtype": "torch.bfloat16"}
    kernel = next(k for k in autotuning.KERNELS if k.name == "_conv2d_implicit_gemm_kernel")
    monkeypatch.setattr(conv._conv2d_implicit_gemm_kernel, "cache", {key: picked})
    monkeypatch.setattr(kernel, "picks", {key: (fields, "tuned, 5 of 5")})
    report.write_outputs(tmp_path, MACHINE, [], [], chart=False)
    (entry,) = json.loads((tmp_path / "results.json").read_text())["autotuned"]
    assert entry == {"kernel": "_conv2d_implicit_gemm_kernel", "family": "conv", "key": fields,
                     "config": autotuning.config_fields(picked), "picked": "tuned, 5 of 5"}
    assert f"`_conv2d_implicit_gemm_kernel` {fields}: " in (tmp_path / "results.md").read_text()


def test_without_matplotlib_the_json_and_markdown_are_written_and_the_chart_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    results = [Result("max_pool2d x", "pooling", "fwd", impl, "ok", rel_error=0.0, median_ms=1.0, speedup=1.0)
               for impl in ("pytorch", "vk.triton")]
    paths = report.write_outputs(tmp_path, MACHINE, results, [])
    assert [p.name for p in paths] == ["results.json", "results.md"] and not (tmp_path / "speedup.png").exists()
    assert report.NO_CHART in capsys.readouterr().out
    assert "max_pool2d x" in (tmp_path / "results.md").read_text()
