"""vkernels.patch: torchvision ResNets, timm ViT attention (routed SDPA), open_clip CLIP, nn.MultiheadAttention and
pooling rewritten in place; state_dict keys and Parameter objects as the stock model's, outputs as
accurate as the stock model's against the same model in float64."""
import copy
import importlib

import pytest
import torch

import vkernels
import vkernels.nn.attention as nn_attention
from support import assert_as_accurate, device_for, relative_error, rounding_floor

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1  # noqa: E402

patch_module = importlib.import_module("vkernels.patch")  # `vkernels.patch` is the function
# Floors under "patched within 2 x stock's error from the stock model in float64", from each model's
# longest sum: ResNet-18's 3x3x512 convs, the 3x3x8 convs of the small ResNet blocks, timm ViT-Tiny's
# 768-wide MLP, the 128-wide MLPs of the small CLIP, a 16-wide attention's projections.
FLOOR_RESNET18, FLOOR_BLOCKS, FLOOR_VIT_TINY, FLOOR_CLIP, FLOOR_ATTENTION = (
    rounding_floor(torch.float32, n) for n in (3 * 3 * 512, 3 * 3 * 8, 768, 128, 16))


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach vkernels' conv2d_relu and attention from patched modules (a
    fallback to torch's own forward makes none)."""
    counts = {"conv2d_relu": 0, "attention": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(patch_module.resnet, "conv2d_relu", counted("conv2d_relu", vkernels.conv2d_relu))
    monkeypatch.setattr(patch_module.attention, "attention", counted("attention", vkernels.attention))
    monkeypatch.setattr(nn_attention, "attention", counted("attention", vkernels.attention))
    return counts


def randomize_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial statistics and affine parameters, so folding them is tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    return model


def patched_copy(model, **kwargs):
    """(patched deep copy, report), checking state_dict keys and that no Parameter was copied."""
    stock_keys = list(model.state_dict().keys())
    twin = copy.deepcopy(model)
    params_before = [id(p) for p in twin.parameters()]
    patched, report = vkernels.patch(twin, report=True, **kwargs)
    assert list(patched.state_dict().keys()) == stock_keys
    assert [id(p) for p in patched.parameters()] == params_before  # optimizers keep working
    return patched, dict(report)


# ---------------------------------------------------------------------------------------- ResNet


def test_resnet18_eval_is_rewired_and_matches(calls):
    stock = randomize_batch_norms(torchvision.models.resnet18(weights=None)).eval()
    patched, report = patched_copy(stock, backend="torch")  # the rewiring; kernels: next test

    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert set(report) == {"conv1", "bn1", "relu", "maxpool", "avgpool", *blocks}
    assert isinstance(patched.maxpool, vkernels.nn.MaxPool2d) and patched.maxpool.backend == "torch"
    assert patched.maxpool.kernel_size == 3 and patched.maxpool.stride == 2 and patched.maxpool.padding == 1
    assert all(isinstance(patched.get_submodule(b), patch_module.ResNetBlock) for b in blocks)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_as_accurate(patched(x), stock(x), copy.deepcopy(stock).double()(x.double()), FLOOR_RESNET18)
    assert calls["conv2d_relu"] == 1 + 2 * len(blocks)  # stem + two fused convs per BasicBlock

    # Weights loaded after patching are seen (the fold is recomputed), and gradients flow through it.
    # Compared in float64: two float32 runs can round a ReLU input near 0 to either side, sending one
    # position's gradient one way in one run and not in the other (1e-2 apart at some seeds).
    other = randomize_batch_norms(torchvision.models.resnet18(weights=None)).eval().double()
    patched.load_state_dict(other.state_dict())
    patched, x = patched.double(), x.double()
    bound = rounding_floor(torch.float64, 3 * 3 * 512)
    with torch.no_grad():
        assert relative_error(patched(x), other(x)) < bound
    patched(x).sum().backward()
    other(x).sum().backward()
    assert relative_error(patched.layer1[0].conv1.weight.grad, other.layer1[0].conv1.weight.grad) < bound
    assert relative_error(patched.conv1.weight.grad, other.conv1.weight.grad) < bound


def test_resnet_blocks_and_stem_on_triton(calls):
    device = device_for("triton")
    downsample = torch.nn.Sequential(conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))
    stock = torch.nn.Sequential(BasicBlock(8, 8), Bottleneck(8, 4, stride=2, downsample=downsample)).to(device)
    stock = randomize_batch_norms(stock).eval()
    patched, report = patched_copy(stock, backend="triton")
    assert set(report) == {"0", "1"} and "conv3+bn3+residual+relu" in report["1"]
    x = torch.randn(2, 8, 8, 8, device=device)
    with torch.no_grad():
        assert_as_accurate(patched(x), stock(x), copy.deepcopy(stock).double()(x.double()), FLOOR_BLOCKS)
    assert calls["conv2d_relu"] == 2 + 3

    resnet = randomize_batch_norms(torchvision.models.resnet18(weights=None)).to(device).eval()
    stem = vkernels.patch(copy.deepcopy(resnet), backend="triton")
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        results = [model.maxpool(model.relu(model.bn1(model.conv1(t))))
                   for model, t in ((stem, x), (resnet, x), (copy.deepcopy(resnet).double(), x.double()))]
    assert_as_accurate(*results, rounding_floor(torch.float32, 7 * 7 * 3))


def test_resnet_train_mode_changes_only_what_is_exact():
    stock = randomize_batch_norms(torchvision.models.resnet18(weights=None)).train()
    patched, report = patched_copy(stock, backend="torch")
    assert set(report) == {"maxpool", "avgpool"}  # BN uses batch statistics: nothing folds
    left = vkernels.patch(copy.deepcopy(stock), report=True)[1].left  # each block is reported with why
    assert {path for path, _ in left} == {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(patched(x), stock(x))  # the same float32 operations

    # Patched in eval mode, then back to training: torchvision's math, batch statistics and all.
    stock.eval()
    patched, _ = patched_copy(stock, backend="torch")
    stock.train(), patched.train()
    assert torch.equal(patched(x), stock(x))
    assert torch.equal(patched.layer1[0].bn1.running_mean, stock.layer1[0].bn1.running_mean)


# -------------------------------------------------------------------------------------- timm ViT


def test_timm_vit_attention_runs_on_vkernels(calls):
    timm = pytest.importorskip("timm")
    device = device_for("triton")
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).to(device).eval()
    patched, report = patched_copy(stock, backend="triton")
    assert set(report) == {f"blocks.{i}.attn" for i in range(12)}
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        assert_as_accurate(patched(x), stock(x), copy.deepcopy(stock).double()(x.double()), FLOOR_VIT_TINY)
    assert calls["attention"] == 12


def test_timm_attention_masks_qk_norm_and_dropout(calls):
    pytest.importorskip("timm")
    from timm.layers.attention import Attention

    device = device_for("triton")
    stock = Attention(16, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).to(device).eval()
    patched = vkernels.patch(copy.deepcopy(stock), backend="triton")
    assert type(patched) is Attention  # timm's own forward, its SDPA call routed to vkernels
    assert patch_module.common.wrapped_forward(patched) is patch_module.attention.sdpa_routed_forward
    x = torch.randn(2, 5, 16, device=device)
    mask = torch.rand(2, 1, 5, 5, device=device) > 0.3
    mask[..., 0] = True  # every query attends to something
    exact = copy.deepcopy(stock).double()
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
            assert_as_accurate(patched(x, **kwargs), stock(x, **kwargs), exact(x.double(), **kwargs), FLOOR_ATTENTION)
    assert calls["attention"] == 3

    dropping = vkernels.patch(Attention(16, num_heads=2, attn_drop=0.5).to(device).train(), backend="triton")
    dropping(x)  # attention dropout has no kernel: SDPA runs
    assert calls["attention"] == 3


# ------------------------------------------------------------------------------------ open_clip


def test_open_clip_towers_run_on_vkernels(calls):
    open_clip = pytest.importorskip("open_clip")
    device = device_for("triton")
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
    stock = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).to(device).eval()
    patched, report = patched_copy(stock, backend="triton")
    towers = [f"{tower}transformer.resblocks.{i}.attn" for tower in ("visual.", "") for i in range(2)]
    assert set(report) == set(towers)

    images = torch.randn(2, 3, 32, 32, device=device)
    tokens = torch.randint(0, 50, (2, 8), device=device)
    exact = copy.deepcopy(stock).double()
    with torch.no_grad():
        assert_as_accurate(patched.encode_image(images), stock.encode_image(images),
                           exact.encode_image(images.double()), FLOOR_CLIP)
        assert calls["attention"] == 2  # open_clip passes need_weights=False: no fallback
        # the text tower's float additive causal mask
        assert_as_accurate(patched.encode_text(tokens), stock.encode_text(tokens), exact.encode_text(tokens), FLOOR_CLIP)
        assert calls["attention"] == 4


# ------------------------------------------------------------------ bare modules, unknown models


def test_bare_multihead_attention_is_replaced_with_same_parameters(calls):
    device = device_for("triton")
    stock = torch.nn.MultiheadAttention(16, 2, batch_first=False, device=device).eval()
    patched, report = vkernels.patch(stock, backend="triton", report=True)
    assert type(patched) is vkernels.nn.MultiheadAttention and report == [("", "MultiheadAttention -> vkernels.nn.MultiheadAttention")]
    assert patched.in_proj_weight is stock.in_proj_weight and patched.out_proj is stock.out_proj
    assert patched.batch_first is False and patched.backend == "triton"
    x = torch.randn(5, 2, 16, device=device)
    out, weights = patched(x, x, x, need_weights=False)
    assert weights is None
    exact = copy.deepcopy(stock).double()(*[x.double()] * 3, need_weights=False)[0]
    assert_as_accurate(out, stock(x, x, x, need_weights=False)[0], exact, FLOOR_ATTENTION)
    assert calls["attention"] == 1


def test_sequential_pooling_is_replaced_with_same_config():
    device = device_for("triton")

    class OwnPool(torch.nn.MaxPool2d):  # a subclass may have its own forward: left alone
        pass

    stock = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        torch.nn.AvgPool2d(2, count_include_pad=False, padding=1),
        OwnPool(2),
        torch.nn.AdaptiveAvgPool2d((2, None)),
    ).to(device)
    patched, report = patched_copy(stock, backend="triton")
    assert report == {
        "1": "MaxPool2d -> vkernels.nn.MaxPool2d",
        "2": "AvgPool2d -> vkernels.nn.AvgPool2d",
        "4": "AdaptiveAvgPool2d -> vkernels.nn.AdaptiveAvgPool2d",
    }
    assert patched[1].ceil_mode and patched[2].count_include_pad is False and patched[2].padding == 1
    assert type(patched[3]) is OwnPool and patched[4].output_size == (2, None)
    x = torch.randn(2, 3, 11, 9, device=device)
    exact = copy.deepcopy(stock).double()(x.double())
    assert_as_accurate(patched(x), stock(x), exact, rounding_floor(torch.float32, 3 * 3 * 3))  # the conv's sums


def test_unknown_model_is_returned_unchanged():
    lstm = torch.nn.LSTM(4, 8, batch_first=True)
    before = copy.deepcopy(lstm.state_dict())
    patched, report = vkernels.patch(lstm, report=True)
    assert patched is lstm and report == []
    assert all(torch.equal(before[k], v) for k, v in lstm.state_dict().items())
    assert vkernels.patch(lstm) is lstm


def test_patching_twice_and_shared_modules():
    pool = torch.nn.MaxPool2d(2)
    model = torch.nn.Sequential(pool, torch.nn.ReLU(), pool)
    patched, report = vkernels.patch(model, backend="torch", report=True)
    assert [path for path, _ in report] == ["0"] and patched[0] is patched[2]
    assert vkernels.patch(patched, report=True)[1] == []
