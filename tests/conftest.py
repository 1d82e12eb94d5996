"""Test set-up: without a GPU, Triton kernels run through the interpreter and the CUDA C++ kernels
through the emulator (vkernels._C_emu), both on CPU tensors.

TRITON_INTERPRET and VKERNELS_CUDA_EMULATE must be set before triton and vkernels are first imported,
so they are set here, before any test module imports vkernels.

Which kernels a test verifies (read by ``python -m vkernels.verify`` from the junit XML of a GPU run):
every call of a public function inside a test records the op, the kernel backend and the dtype that
``vkernels.dispatch.choose`` resolved it to, where it ran (the GPU's compute capability, or "cpu") and
its op family, as the test case's junit property ``vkernels_kernels``. So a new test needs no marker
or naming rule: whatever public op it calls on a kernel backend is what its pass or failure speaks
for. Calls made while torch.compile traces are not recorded (the same test's eager calls are), nor
calls of ``dispatch.choose`` from outside vkernels.ops (tests of the dispatcher itself). A failing
test that recorded no kernel (it failed before its first call, called Triton launchers directly, or
its process died) counts against every kernel of each backend its test id names ("triton", "cuda"):
keep a backend's name in the id of a test of that backend (the KERNEL_BACKENDS parameter ids do).

``VKERNELS_TEST_DEADLINE=<unix time>`` skips the tests not started by then ("out of time"), so that a
run with a time budget (bench/gpu_run.sh) still ends with its junit XML written.
"""
import inspect
import json
import os
import random
import sys
import time
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VKERNELS_CUDA_EMULATE", "1")
else:  # one config per Triton kernel: see vkernels/triton_kernels/autotuning.py
    os.environ.setdefault("VKERNELS_TRITON_AUTOTUNE", "0")
# Inductor's on-disk graph cache can replay graphs traced against an older op schema.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402


# Fresh inputs every run; VKERNELS_TEST_SEED=<the printed value> replays a run (tests/sweep_seeds.py
# runs many seeds).
SESSION_SEED = int(os.environ.get("VKERNELS_TEST_SEED", random.randrange(2**31)))
os.environ["VKERNELS_TEST_SEED"] = str(SESSION_SEED)  # pytest-xdist workers inherit it: one seed per run


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin reads its options
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs the CUDA C++ kernels (on a GPU, else through the emulator)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one, never passed silently)")
    # Hypothesis draws its examples from the session seed too (and, seeded, keeps no example
    # database), so the printed seed replays them; --hypothesis-seed still overrides it.
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(SESSION_SEED)


def pytest_report_header(config):
    from vkernels import backends

    lines = [f"vkernels test seed: VKERNELS_TEST_SEED={SESSION_SEED}"]
    lines += [f"vkernels backend {name}: {'available' if s.available else 'UNAVAILABLE'} ({s.reason})" for name, s in backends().items()]
    return lines


def pytest_terminal_summary(terminalreporter):
    # again at the end, where -q and a long run's scrollback do not hide it
    terminalreporter.write_line(f"vkernels test seed: VKERNELS_TEST_SEED={SESSION_SEED} replays this run")


def pytest_runtest_setup(item):
    deadline = os.environ.get("VKERNELS_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("out of time: VKERNELS_TEST_DEADLINE passed before this test started")


@pytest.fixture(autouse=True)
def record_kernels(request, monkeypatch):
    """Records the kernels the test's public calls ran as its junit property vkernels_kernels."""
    from vkernels import dispatch

    choose, calls = dispatch.choose, set()
    signature = inspect.signature(choose)

    def recording_choose(*args, **kwargs):
        chosen = choose(*args, **kwargs)
        if chosen in dispatch.KERNEL_BACKENDS and not torch.compiler.is_compiling():
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("vkernels.ops."):
                call = signature.bind(*args, **kwargs).arguments
                device = call["device"]
                where = "{}.{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else device.type
                calls.add((call["op"], chosen, str(call["dtype"]).removeprefix("torch."), where, caller.rsplit(".", 1)[1]))
        return chosen

    monkeypatch.setattr(dispatch, "choose", recording_choose)
    yield
    if calls:
        fields = ("op", "backend", "dtype", "where", "family")
        request.node.user_properties.append(("vkernels_kernels", json.dumps([dict(zip(fields, c)) for c in sorted(calls)])))


@pytest.fixture(autouse=True)
def seed(request):
    """Seeds torch per test case from the session seed and the case's id."""
    value = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(value)
    return value
