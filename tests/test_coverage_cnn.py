"""vkernels.patch over a few small CNNs of the zoos: every conv on vkernels ops, chains fused, outputs
and gradients as accurate as the stock model's (``python -m vkernels.patch.coverage_cnn`` prints the
whole table: README's "CNN zoo coverage")."""
import pytest
import torch

from support import rounding_floor

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from vkernels.patch import coverage_cnn  # noqa: E402

# model -> (builder, the share of conv FLOPs whose activation or residual runs in the conv's epilogue
# in eval and in train mode, as counted at 32x32: the counts are deterministic; fused chains without
# either, conv -> BN in eval mode, do not show there)
MODELS = {
    # SiLU, stochastic depth before the residual add, squeeze-excite
    "torchvision efficientnet_b0": (torchvision.models.efficientnet_b0, 0.825, 0.037),
    # conv -> ReLU without BN: fused in train mode too
    "torchvision squeezenet1_1": (torchvision.models.squeezenet1_1, 1.0, 1.0),
    # blocks torch.fx cannot trace (channel shuffle): their Sequentials are fused on their own
    "torchvision shufflenet_v2_x0_5": (torchvision.models.shufflenet_v2_x0_5, 0.953, 0.0),
    # timm's act1 / drop_block / aa modules between conv, BN and ReLU
    "timm resnet18": (lambda: timm.create_model("resnet18"), 0.989, 0.0),
    # timm's EfficientNet blocks: BatchNormAct2d, hardswish, squeeze-excite, drop path before the add
    "timm mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050"), 0.892, 0.404),
}
# Against the stock model in float64 the stock fp32 models are at 1.4e-7..7.7e-7, the patched ones
# (eval: BN folded in float64) alike (python -m vkernels.patch.coverage_cnn, every model of the zoo):
# patched within 2 x stock's error plus the floor of the longest sum, EfficientNet's 1280-wide classifier.
FLOOR = rounding_floor(torch.float32, 1280)


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_runs_on_vkernels_and_as_accurately(name, seed):
    build, epilogue_eval, epilogue_train = MODELS[name]
    for training, epilogue in ((False, epilogue_eval), (True, epilogue_train)):
        found, report = coverage_cnn.coverage(build, 32, training)
        assert found.flops == found.calls == 1.0, report.left
        assert found.epilogue >= epilogue, (training, found)
    errors = coverage_cnn.accuracy(build, 32, "torch", seed)
    assert errors.eval_patched <= 2 * errors.eval_stock + FLOOR, errors
    # train mode rewrites only what is exact: on the torch backend the very same arithmetic
    assert errors.train_patched == errors.train_stock
