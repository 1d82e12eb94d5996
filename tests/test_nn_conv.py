"""vkernels.nn.Conv2dReLU: nn.Conv2d's constructor and state, relu(conv + bias + residual) forward,
and from_conv folding an eval-mode BatchNorm."""
import pytest
import torch
import torch.nn.functional as F

import vkernels
from support import device_for, relative_error
from vkernels.nn.conv import fold_batch_norm

TOL = 1e-5  # fp32 results against the same convolution (and BatchNorm) in float64

# (args, kwargs) of nn.Conv2d; small shapes, since the Triton interpreter is slow
CONVS = [
    ((3, 4, 3), {"padding": 1}),
    ((4, 6, (3, 2)), {"stride": 2, "dilation": (1, 2), "groups": 2, "bias": False}),
    ((3, 5, 1), {"padding": "same"}),
]


def random_batch_norm(channels: int, affine: bool, device) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(channels, affine=affine, eps=1e-3, device=device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize("args,kwargs", CONVS)
def test_module_is_a_drop_in_for_conv2d(args, kwargs):
    device = device_for("triton")
    ours = vkernels.nn.Conv2dReLU(*args, **kwargs, device=device)
    theirs = torch.nn.Conv2d(*args, **kwargs, device=device)
    assert isinstance(ours, torch.nn.Conv2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    fused = "relu" if kwargs.get("bias") is False else "bias+relu"
    assert repr(ours) == f"Conv2dReLU({theirs.extra_repr()}, fused={fused})"
    assert "backend='triton'" in repr(vkernels.nn.Conv2dReLU(*args, **kwargs, backend="triton"))

    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, args[0], 7, 6, device=device)
    with vkernels.use_backend("triton"):  # backend=None defers to the innermost use_backend
        out = ours(x)
    assert relative_error(out, F.relu(theirs.double()(x.double()))) < TOL


def test_residual_is_added_before_relu():
    device = device_for("triton")
    module = vkernels.nn.Conv2dReLU(3, 4, 3, padding=1, backend="triton", device=device)
    x = torch.randn(2, 3, 5, 6, device=device)
    residual = torch.randn(2, 4, 5, 6, device=device)
    expected = F.relu(F.conv2d(x.double(), module.weight.double(), module.bias.double(), padding=1) + residual.double())
    assert relative_error(module(x, residual), expected) < TOL
    assert relative_error(module(x, residual=residual), expected) < TOL


@pytest.mark.parametrize("args,kwargs", CONVS[:2])
@pytest.mark.parametrize("norm", ["none", "affine", "not_affine"])
def test_from_conv_equals_relu_bn_conv(args, kwargs, norm):
    device = device_for("triton")
    conv = torch.nn.Conv2d(*args, **kwargs, device=device)
    bn = None if norm == "none" else random_batch_norm(conv.out_channels, norm == "affine", device)
    fused = vkernels.nn.Conv2dReLU.from_conv(conv, bn, backend="triton")
    assert fused.backend == "triton" and fused.weight.dtype == conv.weight.dtype
    assert (fused.bias is None) == (conv.bias is None and bn is None)

    x = torch.randn(2, args[0], 7, 6, device=device)
    expected = conv.double()(x.double())
    if bn is not None:
        expected = bn.double()(expected)
    assert relative_error(fused(x), F.relu(expected)) < TOL


def test_fold_batch_norm_rejects_train_mode_and_missing_stats():
    conv = torch.nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="training mode"):
        vkernels.nn.Conv2dReLU.from_conv(conv, torch.nn.BatchNorm2d(4))  # modules start in train mode
    with pytest.raises(ValueError, match="running statistics"):
        fold_batch_norm(conv.weight, conv.bias, torch.nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="features"):
        fold_batch_norm(conv.weight, conv.bias, torch.nn.BatchNorm2d(5).eval())


def test_padding_mode_other_than_zeros_is_refused():
    with pytest.raises(NotImplementedError, match="padding_mode='reflect'"):
        vkernels.nn.Conv2dReLU(3, 4, 3, padding=1, padding_mode="reflect")
