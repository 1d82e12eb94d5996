"""vkernels.patch: conv chains (torchvision ResNets, hand-written blocks, Sequentials), timm ViT
attention (routed SDPA), open_clip CLIP, nn.MultiheadAttention and pooling rewritten in place;
outputs, state_dict keys and Parameter objects as the stock model's."""
import copy
import importlib
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vkernels
import vkernels.nn.attention as nn_attention
from support import assert_as_accurate, device_for, relative_error, rounding_floor

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1  # noqa: E402

patch_module = importlib.import_module("vkernels.patch")  # `vkernels.patch` is the function
nn_conv = importlib.import_module("vkernels.nn.conv")
# Floors under "patched within 2 x stock's error from the stock model in float64", from each model's
# longest sum: ResNet-18's 3x3x512 convs, the 3x3x8 convs of the small ResNet blocks, timm ViT-Tiny's
# 768-wide MLP, the 128-wide MLPs of the small CLIP, a 16-wide attention's projections.
FLOOR_RESNET18, FLOOR_BLOCKS, FLOOR_VIT_TINY, FLOOR_CLIP, FLOOR_ATTENTION = (
    rounding_floor(torch.float32, n) for n in (3 * 3 * 512, 3 * 3 * 8, 768, 128, 16))
# The chain zoo's longest sums: train-mode BN statistics over 2 x 5 x 5 positions (its 3x3x3 stem is shorter).
FLOOR_CHAIN_ZOO = rounding_floor(torch.float32, 2 * 5 * 5)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach vkernels' conv2d (recording activation and residual) and attention
    from patched modules (a fallback to torch's own forward makes none)."""
    counts = {"conv2d": [], "attention": 0}

    def counted_conv2d(*args, **kwargs):
        counts["conv2d"].append((kwargs.get("activation"), kwargs.get("residual") is not None))
        return vkernels.conv2d(*args, **kwargs)

    def counted_attention(*args, **kwargs):
        counts["attention"] += 1
        return vkernels.attention(*args, **kwargs)

    monkeypatch.setattr(patch_module.conv, "conv2d", counted_conv2d)
    monkeypatch.setattr(nn_conv, "conv2d", counted_conv2d)
    monkeypatch.setattr(patch_module.attention, "attention", counted_attention)
    monkeypatch.setattr(nn_attention, "attention", counted_attention)
    return counts


class OpCalls(TorchDispatchMode):
    """Counts the vkernels ops and aten convolutions a forward dispatches."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("vkernels::") or name == "aten::convolution":
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


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
    """(patched deep copy, report as a dict), checking state_dict keys and that no Parameter was copied."""
    stock_keys = list(model.state_dict().keys())
    twin = copy.deepcopy(model)
    params_before = [id(p) for p in twin.parameters()]
    patched, report = vkernels.patch(twin, report=True, **kwargs)
    assert list(patched.state_dict().keys()) == stock_keys
    assert [id(p) for p in patched.parameters()] == params_before  # optimizers keep working
    return patched, dict(report)


def in_float64(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double()


def results(model: nn.Module, x: torch.Tensor, grads: bool = False) -> dict[str, torch.Tensor]:
    """model(x) and, with ``grads``, every parameter gradient of its mean square (taken in float64) as
    one vector: a conv bias ahead of a train-mode BN has a zero gradient up to rounding, whose relative
    error alone would be a chance draw."""
    out = model(x)
    found = {"output": out.detach()}
    if grads:
        out.double().square().mean().backward()
        found["gradients"] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return found


def assert_patched_as_accurate(patched: nn.Module, stock: nn.Module, x: torch.Tensor, floor: float,
                               grads: bool = False) -> None:
    """The patched model within 2 x stock's error from the stock model in float64 (assert_as_accurate)."""
    exact = results(in_float64(stock), x.double(), grads)
    assert_as_accurate(results(patched, x, grads), results(stock, x, grads), exact, floor)


def forwards(report: dict) -> dict:
    """The report's rewritten forwards: module path -> its fused chains."""
    prefix = "forward() with fused conv chains: "
    return {path: what.removeprefix(prefix) for path, what in report.items() if what.startswith(prefix)}


# ---------------------------------------------------------------------------------------- ResNet


def test_resnet18_eval_fuses_every_chain(calls):
    stock = randomize_batch_norms(torchvision.models.resnet18(weights=None)).eval()
    patched, report = patched_copy(stock, backend="torch")  # the rewiring; kernels: the next tests

    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    downsamples = [f"layer{i}.0.downsample" for i in range(2, 5)]
    assert forwards(report) == {
        "": "conv1+bn1+relu",
        **{b: "conv1+bn1+relu, conv2+bn2+residual+relu" + (", downsample.0+downsample.1" if b + ".downsample" in downsamples else "")
           for b in blocks},
        **{d: "0+1" for d in downsamples},
    }
    convs = [name for name, m in stock.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(report[c] == "Conv2d -> vkernels.nn.Conv2dAct" for c in convs)
    assert isinstance(patched.maxpool, vkernels.nn.MaxPool2d) and patched.maxpool.backend == "torch"
    assert type(patched.layer1[0]) is BasicBlock and patched.layer1[0].stride == 1  # class and attributes kept

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_patched_as_accurate(patched, stock, x, FLOOR_RESNET18)
    # the stem, each block's two convs (the second with the residual), the downsamples with BN only
    assert sorted(calls["conv2d"], key=str) == sorted([("relu", False)] * 9 + [("relu", True)] * 8 + [(None, False)] * 3, key=str)

    # Weights loaded after patching are seen (the fold is recomputed).
    other = randomize_batch_norms(torchvision.models.resnet18(weights=None)).eval()
    patched.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_patched_as_accurate(patched, other, x, FLOOR_RESNET18)


def test_gradients_flow_through_the_folded_batch_norms():
    """Frozen-statistics fine-tuning: conv and BN affine parameters get the stock gradients. In float64
    on both sides (the torch backend), where no ReLU of the 18 layers flips between the two roundings:
    in fp32 about one run in 25 meets a pre-activation within rounding of zero, and its gradient
    differs from float64's by up to 1e-3 in the stock model as in the patched one."""
    stock = in_float64(randomize_batch_norms(torchvision.models.resnet18(weights=None)).eval())
    patched, _ = patched_copy(stock, backend="torch")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    patched(x).sum().backward()
    stock(x).sum().backward()
    for name, param in stock.named_parameters():
        assert relative_error(patched.get_parameter(name).grad, param.grad) < 1e-12, name


def test_resnet_train_mode_changes_only_what_is_exact(calls):
    """In train mode BN normalizes by batch statistics: the convs run alone (exact), BN and ReLU as
    before; the same model back in eval mode folds. Bit-identical to stock on the torch backend."""
    stock = randomize_batch_norms(torchvision.models.resnet18(weights=None)).train()
    patched, report = patched_copy(stock, backend="torch")
    assert "layer1.0" in forwards(report)  # traced in both modes
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(patched(x), stock(x))
    assert torch.equal(patched.layer1[0].bn1.running_mean, stock.layer1[0].bn1.running_mean)
    assert all(activation is None for activation, _ in calls["conv2d"]) and len(calls["conv2d"]) == 20
    patched.eval(), stock.eval()
    calls["conv2d"].clear()
    with torch.no_grad():
        assert_patched_as_accurate(patched, stock, x, FLOOR_RESNET18)
    assert sum(activation == "relu" for activation, _ in calls["conv2d"]) == 17


def test_resnet_blocks_on_triton():
    device = device_for("triton")
    downsample = torch.nn.Sequential(conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))
    stock = torch.nn.Sequential(BasicBlock(8, 8), Bottleneck(8, 4, stride=2, downsample=downsample)).to(device)
    stock = randomize_batch_norms(stock).eval()
    patched, report = patched_copy(stock, backend="triton")
    assert forwards(report) == {"0": "conv1+bn1+relu, conv2+bn2+residual+relu",
                                # the costlier conv of the add takes it: the downsample reads 8 channels, conv3 4
                                "1": "conv1+bn1+relu, conv2+bn2+relu, conv3+bn3, downsample.0+downsample.1+residual+relu",
                                "1.downsample": "0+1"}
    x = torch.randn(2, 8, 8, 8, device=device)
    with torch.no_grad(), OpCalls() as ops:
        patched(x)
    with torch.no_grad():
        assert_patched_as_accurate(patched, stock, x, FLOOR_BLOCKS)
    assert ops.counts == {"vkernels::conv2d_relu_triton": 5, "vkernels::conv2d_triton": 1}


# ------------------------------------------------------------------- conv chains of any family


class SqueezeExciteBlock(nn.Module):
    """Chains written in a forward: conv -> BN -> functional hardswish; a squeeze-excite Sequential
    (conv -> SiLU, then a lone conv and a gate); depthwise conv -> BN -> dropout -> + x -> GELU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 2, 1), nn.SiLU(), nn.Conv2d(2, channels, 1),
                                nn.Sigmoid())
        self.drop = nn.Dropout(0.0)  # a drop between BN and the add (the identity even in train mode: comparable)

    def forward(self, x):
        out = F.hardswish(self.bn1(self.conv1(x)))
        out = out * self.se(out)
        return F.gelu(x + self.drop(self.bn2(self.conv2(out))))


def chain_zoo() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6()),
        SqueezeExciteBlock(8),
        nn.Conv2d(8, 8, 1),
        nn.LeakyReLU(0.2),
    )


CHAIN_ZOO_FORWARDS = {
    "": "0.0+0.1+relu6, 2+leaky_relu",
    "0": "0+1+relu6",
    "1": "conv1+bn1+hardswish, se.1+silu, conv2+bn2+drop+residual+gelu",
    "1.se": "1+silu",
}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_chain_zoo_on_triton(mode):
    """Every conv of the model through vkernels ops, fused as CHAIN_ZOO_FORWARDS says, results and
    (train mode) parameter gradients as the stock model's in float64."""
    device = device_for("triton")
    stock = randomize_batch_norms(chain_zoo()).to(device).train(mode == "train")
    patched, report = patched_copy(stock, backend="triton")
    assert forwards(report) == CHAIN_ZOO_FORWARDS
    x = torch.randn(2, 3, 10, 9, device=device)
    with torch.no_grad(), OpCalls() as ops:
        out = patched(x)
    assert ops.counts == {"vkernels::conv2d_triton": 6, "vkernels::adaptive_avg_pool2d_triton": 1}  # no aten convolution
    assert torch.equal(copy.deepcopy(patched)(x), out)  # a deep copy runs its own rewritten forwards
    assert_patched_as_accurate(patched, stock, x, FLOOR_CHAIN_ZOO, grads=mode == "train")


def test_rewritten_forwards_compile_whole():
    """The rewritten forwards, the fold and the fused convs stay one graph under torch.compile."""
    device = device_for("triton")
    stock = randomize_batch_norms(chain_zoo()).to(device).eval()
    patched, _ = patched_copy(stock, backend="triton")
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True)
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        assert_as_accurate(compiled(x), stock(x), in_float64(stock)(x.double()), FLOOR_CHAIN_ZOO)


def test_chains_switch_with_the_mode():
    """Patched in eval mode, trained, evaluated again: each mode runs its own graph (and the train-mode
    step updates the BN statistics the eval mode then folds); pickled and loaded, it runs the same."""
    stock = randomize_batch_norms(chain_zoo()).eval()
    patched, _ = patched_copy(stock, backend="torch")
    x = torch.randn(2, 3, 10, 9)
    for mode in (True, False):
        stock.train(mode), patched.train(mode)
        assert_patched_as_accurate(patched, stock, x, FLOOR_CHAIN_ZOO)
    unpickled = pickle.loads(pickle.dumps(patched))  # the rewritten forwards travel as their source
    with torch.no_grad():
        assert torch.equal(unpickled(x), patched(x))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on values
            x = -x
        return F.relu(self.bn(self.conv(x)))


class OptionalScale(DataDependent):
    def forward(self, x, scale=1.0):
        return F.relu(self.bn(self.conv(x))) * scale


class SamePadding(nn.Conv2d):  # a subclass may pad in its forward, as timm's Conv2dSame does
    pass


def test_what_is_left_is_reported_and_still_runs():
    stock = nn.ModuleDict(dict(
        branchy=DataDependent(), optional=OptionalScale(), subclass=SamePadding(3, 4, 3),
        reflect=nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    )).eval()
    patched, report = patched_copy(stock, backend="torch")
    left = dict(vkernels.patch(copy.deepcopy(stock), report=True)[1].left)
    assert left.keys() == {"branchy", "optional", "subclass", "reflect"}
    assert "torch.fx cannot trace it (TraceError" in left["branchy"]
    assert "scale=1.0" in left["optional"] and "padding_mode='reflect'" in left["reflect"]
    assert report["branchy.conv"] == "Conv2d -> vkernels.nn.Conv2dAct"  # its conv still runs vkernels
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        for name, module in stock.items():
            assert_patched_as_accurate(patched[name], module, x, rounding_floor(torch.float32, 3 * 3 * 3))


# -------------------------------------------------------------------------------------- timm ViT


def test_timm_vit_attention_runs_on_vkernels(calls):
    timm = pytest.importorskip("timm")
    device = device_for("triton")
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).to(device).eval()
    patched, report = patched_copy(stock, backend="triton")
    assert set(report) == {"patch_embed.proj", *(f"blocks.{i}.attn" for i in range(12))}
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
    assert set(report) == {"visual.conv1", *towers}

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
        "0": "Conv2d -> vkernels.nn.Conv2dAct",
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
