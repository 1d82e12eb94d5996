"""Test set-up: Triton kernels run through the interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports vkernels.
"""
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one config per Triton kernel: see vkernels/triton_kernels/autotuning.py
    os.environ.setdefault("VKERNELS_TRITON_AUTOTUNE", "0")
# Inductor's on-disk graph cache can replay graphs traced against an older op schema.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one, never passed silently)")


# Fresh inputs every run; VKERNELS_TEST_SEED=<the printed value> replays a run.
SESSION_SEED = int(os.environ.get("VKERNELS_TEST_SEED", random.randrange(2**31)))
os.environ["VKERNELS_TEST_SEED"] = str(SESSION_SEED)  # pytest-xdist workers inherit it: one seed per run


def pytest_report_header(config):
    from vkernels import backends

    lines = [f"vkernels test seed: VKERNELS_TEST_SEED={SESSION_SEED}"]
    lines += [f"vkernels backend {name}: {'available' if s.available else 'UNAVAILABLE'} ({s.reason})" for name, s in backends().items()]
    return lines


@pytest.fixture(autouse=True)
def seed(request):
    """Seeds torch per test case from the session seed and the case's id."""
    value = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(value)
    return value
