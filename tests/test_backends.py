"""Backend choice: availability report, auto, use_backend, forced backends that cannot serve."""
import pytest
import torch

import vkernels
from vkernels import dispatch
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
    monkeypatch.setattr(dispatch, "VERIFIED", {})
    chosen = dispatch.choose(None, torch.device(device), torch.float16, POOLING_DTYPES, op="max_pool2d")
    assert chosen == "torch"


def test_auto_selects_a_verified_available_kernel_on_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "VERIFIED", {"max_pool2d": frozenset({"cuda", "triton"})})
    monkeypatch.setattr(dispatch, "PREFERENCE", {"max_pool2d": ("cuda", "triton")})
    available = dispatch.BackendStatus(True, "test")
    monkeypatch.setitem(dispatch._STATUS, "cuda", available)
    monkeypatch.setitem(dispatch._STATUS, "triton", available)
    monkeypatch.setattr(dispatch, "TRITON_INTERPRETED", False)
    monkeypatch.setattr(dispatch, "has_cuda_kernel", lambda op: True)
    cuda = torch.device("cuda")
    assert dispatch.choose(None, cuda, torch.float16, POOLING_DTYPES, op="max_pool2d") == "cuda"
    # a per-input limit moves auto to the next verified backend, then to torch
    assert dispatch.choose(None, cuda, torch.float16, POOLING_DTYPES, {"cuda": "no"}, op="max_pool2d") == "triton"
    assert dispatch.choose(None, cuda, torch.int32, POOLING_DTYPES, op="max_pool2d") == "torch"
    # auto keeps CPU tensors on torch even when a kernel is verified
    assert dispatch.choose(None, torch.device("cpu"), torch.float32, POOLING_DTYPES, op="max_pool2d") == "torch"
    # verification is per op: another op of the same family stays on torch
    assert dispatch.choose(None, cuda, torch.float16, POOLING_DTYPES, op="avg_pool2d") == "torch"
    # "torch" in the preference order ends the search: stock PyTorch is faster than what follows
    monkeypatch.setattr(dispatch, "PREFERENCE", {"max_pool2d": ("torch", "cuda")})
    assert dispatch.choose(None, cuda, torch.float16, POOLING_DTYPES, op="max_pool2d") == "torch"


def test_use_backend_nests_and_backend_argument_wins():
    cpu = torch.device("cpu")
    choose = lambda requested=None: dispatch.choose(requested, cpu, torch.float32, POOLING_DTYPES, op="max_pool2d")
    assert choose() == "torch"
    with vkernels.use_backend("torch"):
        with vkernels.use_backend("auto"):
            assert choose() == "torch"
        assert choose() == "torch"
        with pytest.raises(vkernels.BackendUnavailableError):
            choose("cuda")
    with pytest.raises(ValueError, match="unknown vkernels backend"):
        with vkernels.use_backend("fastest"):
            pass


def test_forced_backend_that_cannot_serve_lists_every_reason():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(vkernels.BackendUnavailableError) as error:
        vkernels.max_pool2d(x, 2, backend="cuda")
    message = str(error.value)
    assert "'cuda' cannot serve" in message and "triton:" in message and "torch:" in message


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
