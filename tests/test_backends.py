"""Backend choice: availability report, auto, use_backend, forced backends that cannot serve."""
import os
import subprocess
import sys

import pytest
import torch

import vkernels
from vkernels import dispatch
from vkernels.verified import Verification
from support import device_for

POOLING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def test_backends_reports_every_backend_with_a_reason():
    report = vkernels.backends()
    assert set(report) == {"triton", "cuda", "torch"}
    assert report["torch"].available
    for status in report.values():
        assert isinstance(status.available, bool) and status.reason


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_never_selects_an_unverified_kernel(device, monkeypatch):
    monkeypatch.setattr(dispatch, "_VERIFICATION", Verification({}, {}))
    chosen = dispatch.choose(None, torch.device(device), torch.float16, POOLING_DTYPES, op="max_pool2d")
    assert chosen == "torch"


def fake_sm90_with_both_kernel_backends(monkeypatch) -> None:
    """A CUDA device of compute capability 9.0 on which both kernel backends can serve max_pool2d."""
    available = dispatch.BackendStatus(True, "test")
    monkeypatch.setitem(dispatch._STATUS, "cuda", available)
    monkeypatch.setitem(dispatch._STATUS, "triton", available)
    monkeypatch.setattr(dispatch, "TRITON_INTERPRETED", False)
    monkeypatch.setattr(dispatch, "CUDA_EMULATED", False)
    monkeypatch.setattr(dispatch, "CUDA_KERNEL_DEVICE", "cuda")
    monkeypatch.setattr(dispatch, "has_cuda_kernel", lambda op: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_auto_selects_a_verified_available_kernel_on_cuda(monkeypatch):
    fake_sm90_with_both_kernel_backends(monkeypatch)
    order = ("cuda", "triton", "torch")
    monkeypatch.setattr(dispatch, "_VERIFICATION", Verification(
        {("max_pool2d", "9.0", torch.float16): frozenset({"cuda", "triton"}), ("max_pool2d", "9.0", torch.float32): frozenset({"triton"})},
        {("max_pool2d", "9.0", torch.float16, "all"): order, ("max_pool2d", "9.0", torch.float32, "all"): order}))
    cuda = torch.device("cuda", 0)
    choose = lambda dtype=torch.float16, **kw: dispatch.choose(None, kw.pop("device", cuda), dtype, POOLING_DTYPES, op=kw.pop("op", "max_pool2d"), **kw)
    assert choose() == "cuda"
    # a per-input limit moves auto to the next verified backend, then to torch
    assert dispatch.choose(None, cuda, torch.float16, POOLING_DTYPES, {"cuda": "no"}, op="max_pool2d") == "triton"
    assert choose(torch.int32) == "torch"
    # verification is per dtype: fp32 passed on triton only; bf16 passed nowhere
    assert choose(torch.float32) == "triton"
    assert choose(torch.bfloat16) == "torch"
    # auto keeps CPU tensors on torch even when a kernel is verified
    assert choose(torch.float32, device=torch.device("cpu")) == "torch"
    # verification is per op: another op of the same family stays on torch
    assert choose(op="avg_pool2d") == "torch"
    # and per shape class of the preference order: a class nobody measured stays on torch
    assert choose(shape_class="spatial") == "torch"
    # an sm_90 result says nothing about sm_80 or sm_100
    for capability in ((8, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert choose(device=torch.device("cuda", 1)) == "torch"


def test_torch_in_the_preference_order_ends_the_search(monkeypatch):
    fake_sm90_with_both_kernel_backends(monkeypatch)
    monkeypatch.setattr(dispatch, "_VERIFICATION", Verification(
        {("max_pool2d", "9.0", torch.float16): frozenset({"cuda", "triton"})},
        {("max_pool2d", "9.0", torch.float16, "all"): ("torch", "cuda")}))
    assert dispatch.choose(None, torch.device("cuda", 0), torch.float16, POOLING_DTYPES, op="max_pool2d") == "torch"


def test_choose_traces_without_graph_breaks(monkeypatch):
    """Under torch.compile(fullgraph=True) auto's choice, GPU architecture included, is a constant."""
    fake_sm90_with_both_kernel_backends(monkeypatch)
    monkeypatch.setattr(dispatch, "_VERIFICATION", Verification(
        {("max_pool2d", "9.0", torch.float16): frozenset({"triton"})},
        {("max_pool2d", "9.0", torch.float16, "all"): ("triton", "torch")}))

    def pick(x):
        chosen = dispatch.choose(None, torch.device("cuda", 0), torch.float16, POOLING_DTYPES, op="max_pool2d")
        return x + (1 if chosen == "triton" else 2)

    torch._dynamo.reset()
    x = torch.randn(3)
    assert torch.equal(torch.compile(pick, fullgraph=True)(x), x + 1)


def test_use_backend_nests_and_backend_argument_wins():
    cpu = torch.device("cpu")
    choose = lambda requested=None: dispatch.choose(requested, cpu, torch.float32, POOLING_DTYPES, op="max_pool2d")
    assert choose() == "torch"
    with vkernels.use_backend("torch"):
        with vkernels.use_backend("auto"):
            assert choose() == "torch"
        assert choose() == "torch"
        with pytest.raises(vkernels.BackendUnavailableError):  # no backend's kernels take meta tensors
            dispatch.choose("cuda", torch.device("meta"), torch.float32, POOLING_DTYPES, op="max_pool2d")
    with pytest.raises(ValueError, match="unknown vkernels backend"):
        with vkernels.use_backend("fastest"):
            pass


def test_forced_backend_that_cannot_serve_lists_every_reason():
    x = torch.randint(0, 9, (1, 2, 4, 4))  # integers: no kernel backend takes them
    with pytest.raises(vkernels.BackendUnavailableError) as error:
        vkernels.max_pool2d(x, 2, backend="cuda")
    message = str(error.value)
    assert "'cuda' cannot serve" in message and "triton:" in message and "torch:" in message


def test_auto_never_selects_the_emulated_cuda_backend(monkeypatch):
    """Emulated CUDA kernels are evidence of correctness, not speed: even verified, auto passes them by."""
    fake_sm90_with_both_kernel_backends(monkeypatch)
    monkeypatch.setattr(dispatch, "CUDA_EMULATED", True)
    monkeypatch.setattr(dispatch, "CUDA_KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(dispatch, "_VERIFICATION", Verification(
        {("max_pool2d", "9.0", torch.float16): frozenset({"cuda"})},
        {("max_pool2d", "9.0", torch.float16, "all"): ("cuda", "torch")}))
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert dispatch.choose(None, device, torch.float16, POOLING_DTYPES, op="max_pool2d") == "torch"


@pytest.mark.skipif(not dispatch.CUDA_EMULATED, reason="runs where the CUDA kernels are emulated (no GPU)")
def test_emulated_cuda_backend_takes_cpu_tensors_and_says_so():
    status = vkernels.backends()["cuda"]
    assert status.available and "emulated" in status.reason
    assert dispatch.choose("cuda", torch.device("cpu"), torch.float16, POOLING_DTYPES, op="max_pool2d") == "cuda"
    with pytest.raises(vkernels.BackendUnavailableError, match="take CPU tensors"):
        dispatch.choose("cuda", torch.device("cuda"), torch.float16, POOLING_DTYPES, op="max_pool2d")


def test_cuda_emulation_is_off_without_the_variable():
    """VKERNELS_CUDA_EMULATE is read at import; unset (or 0), the cuda backend is the GPU build's."""
    env = {k: v for k, v in os.environ.items() if k != "VKERNELS_CUDA_EMULATE"}
    code = "import vkernels; from vkernels import dispatch; print(dispatch.CUDA_EMULATED, vkernels.backends()['cuda'].reason)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    emulated, reason = result.stdout.strip().split(" ", 1)
    assert emulated == "False" and "emulated" not in reason


def test_forced_backend_refuses_unsupported_dtype():
    device = device_for("triton")
    with pytest.raises(vkernels.BackendUnavailableError, match="dtype"):
        vkernels.max_pool2d(torch.randint(0, 9, (1, 2, 4, 4), device=device), 2, backend="triton")


def test_ops_show_in_the_profiler_under_their_names():
    device = device_for("triton")
    x = torch.randn(1, 2, 6, 6, device=device)
    with torch.profiler.profile() as profile:
        vkernels.max_pool2d(x, 2, backend="triton")
    assert "vkernels::max_pool2d_triton" in {event.name for event in profile.events()}
