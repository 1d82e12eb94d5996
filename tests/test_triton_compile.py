"""A few bf16 Triton kernel variants compiled for sm_90 (H100) without a GPU, by bench/compile_check.py.

The interpreter the other Triton tests run on compiles nothing and cannot do bf16, so tl.dot shape and
dtype rules, shared memory and the bf16 paths are only checked here (and by the full
`python bench/compile_check.py`). On a GPU machine the GPU tests compile and run every kernel instead.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the first autotune config of: attention forward and backward at head dims 64 and 80 (one chunk, two
# chunks) with a bool mask, conv forward and backward (tap-major 3x3, stride 2, the 3-channel stem; a
# 5x5/2 depthwise conv with SiLU on the direct kernels), max-pool forward and backward
CASES = (r"^(attention d(64|80) bool mask|conv 3x3|conv 3x3 stride 2|conv 7x7 stem|"
         r"conv depthwise 5x5 stride 2 silu channels_last|max_pool 3/2/1) bfloat16$")
KERNELS = {
    "_attention_forward_kernel", "_attention_backward_delta_kernel", "_attention_backward_key_kernel",
    "_attention_backward_query_kernel", "_conv2d_implicit_gemm_kernel", "_conv2d_weight_grad_kernel",
    "depthwise_conv2d_kernel", "depthwise_conv2d_weight_grad_kernel",
    "_max_pool2d_forward_kernel", "_max_pool2d_backward_kernel",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests compile and run the kernels")
def test_bf16_kernels_compile_for_sm90(tmp_path):
    results_path = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--quick", "--dtypes", "bfloat16",
               "--only", CASES, "--json", str(results_path)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    results = json.loads(results_path.read_text())
    assert {r["kernel"] for r in results} == KERNELS
    assert all(r["ok"] and r["shared"] <= 232448 for r in results)
    assert all(r["variant"].startswith("bf16") for r in results)  # the first pointer's dtype
