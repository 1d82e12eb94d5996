"""vkernels.patch over a few small CNNs of the zoos: every conv on vkernels ops, chains fused, outputs
and gradients as accurate as the stock model's (``python -m vkernels.patch.coverage_cnn`` prints the
whole table: README's "CNN zoo coverage")."""
import pytest

pytest.importorskip("torchvision")
pytest.importorskip("timm")

from vkernels.patch import coverage_cnn  # noqa: E402

# model -> the share of conv FLOPs whose activation or residual runs in the epilogue, eval and train
# mode, at least (fused chains that do not show there: conv -> BN alone, in eval mode)
MODELS = {
    "torchvision mobilenet_v3_small": (0.8, 0.0),  # hardswish, squeeze-excite (train: its conv -> ReLU)
    "torchvision squeezenet1_1": (1.0, 1.0),  # conv -> ReLU without BN: fused in train mode too
    "torchvision shufflenet_v2_x0_5": (0.9, 0.0),  # blocks torch.fx cannot trace: their Sequentials are
    "timm resnet18": (0.95, 0.0),  # timm's act1 / drop_block / aa between conv, BN and ReLU
    "timm efficientnet_b0": (0.8, 0.0),  # BatchNormAct2d, SiLU, drop path before the residual add
}
# Against the stock model in float64: the stock fp32 models are at 1.4e-7..3.3e-7, the patched ones
# (eval: BN folded in float64) at 1.8e-7..3.2e-7 over the zoo (python -m vkernels.patch.coverage_cnn).
FLOAT64_TOL = 2e-6


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_runs_on_vkernels_and_as_accurately(name):
    model = next(m for m in coverage_cnn.zoo() if m.name == name)
    epilogue_eval, epilogue_train = MODELS[name]
    for training, epilogue in ((False, epilogue_eval), (True, epilogue_train)):
        found, report = coverage_cnn.coverage(model.build, 32, training)
        assert found.flops == found.calls == 1.0, report.left
        assert found.epilogue >= epilogue, (training, found)
    errors = coverage_cnn.accuracy(model.build, 32, "torch")
    assert errors.eval_patched < FLOAT64_TOL and errors.eval_stock < FLOAT64_TOL
    # train mode rewrites only what is exact: on the torch backend the very same arithmetic
    assert errors.train_patched == errors.train_stock
