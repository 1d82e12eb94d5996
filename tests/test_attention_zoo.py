"""vkernels.patch across the ViT zoos (timm, torchvision, transformers) at tiny configs: every
attention FLOP through vkernels ops, and outputs and parameter gradients (relative-position bias
tables included) as close to float64 as the stock float32 model's; windows, the SDPA routing and
transformers' registry rewired without copying a parameter; the routing under torch.compile.

The whole zoo and its table: python -m vkernels.patch.attention_coverage (README)."""
import copy
import importlib

import pytest
import torch

import vkernels
from support import KERNEL_BACKENDS, assert_as_accurate, device_for, rounding_floor

attention_coverage = pytest.importorskip("vkernels.patch.attention_coverage")
patch_module = importlib.import_module("vkernels.patch")  # `vkernels.patch` is the function

# One model per mechanism the CI runs (each a few seconds in the Triton interpreter); the coverage
# script runs the rest.
CI_MODELS = {
    "timm Swin-T": "timm",  # windows as batch entries, shift mask + learned bias table
    "torchvision swin_v2_t": "torchvision",  # cosine attention, logit scale, bias from an MLP
    "timm BEiT (relative position bias)": "timm",  # routed SDPA with a learned bias
    "transformers CLIPModel": "transformers",  # AttentionInterface, causal + padding masks
    # native resolution (issue 16): packed images and windows, RoPE rotated in the kernels
    "transformers Qwen2-VL vision tower": "transformers",  # varlen over the images, 2-D RoPE
    "transformers Qwen2.5-VL vision tower": "transformers",  # windows in one block, whole images in the other
    "timm DINOv3 ViT-S/16 (RoPE, 4 registers)": "timm",  # rotate-half rope, unrotated prefix tokens
    "timm EVA-02-Ti (RoPE)": "timm",  # interleaved rope
}
# The CUDA kernels (emulated: 2-6 s each) on the models with a learned bias, packed windows and images
# with 2-D RoPE, and rotate-half RoPE beside unrotated prefix tokens; their masks and causal attention
# have kernel tests of their own.
CUDA_MODELS = ("timm Swin-T", "torchvision swin_v2_t", "timm BEiT (relative position bias)",
               "transformers Qwen2.5-VL vision tower", "timm DINOv3 ViT-S/16 (RoPE, 4 registers)",
               "transformers Qwen2-VL vision tower", "timm EVA-02-Ti (RoPE)")


@pytest.mark.parametrize("backend, name", [
    pytest.param(backend.values[0], name, id=f"{name}-{backend.id}", marks=backend.marks)
    for backend in KERNEL_BACKENDS for name in CI_MODELS if backend.values[0] == "triton" or name in CUDA_MODELS
])
def test_patched_zoo_model_runs_its_attention_on_vkernels(backend, name):
    pytest.importorskip(CI_MODELS[name])
    entry = attention_coverage.ZOO_BY_NAME[name]
    row, results = attention_coverage.measure(entry, backend, device=device_for(backend))
    assert row.eval_share == row.train_share == 1.0 and row.left == []
    # Output, all parameter gradients, bias-table gradients: against the float64 model each is within
    # 2x of stock float32's own error plus the rounding floor of the longest sum, a 4 x 64-wide MLP.
    # Measured over the whole zoo, seeds 0 and 1: patched float32 / stock float32 error ratios
    # 0.86-1.10, errors 1e-7-2e-6; in CI's four, up to 1.6 (1.0e-6 against 6.4e-7) at seed 71271.
    triples = zip(results["patched"], results["stock"], results["float64"])
    kept = {str(i): triple for i, triple in enumerate(triples) if triple[2].numel()}
    assert_as_accurate(*({i: triple[k] for i, triple in kept.items()} for k in range(3)), rounding_floor(torch.float32, 256))


def test_swin_windows_keep_state_and_patch_once():
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    stock, inputs = attention_coverage.ZOO_BY_NAME["torchvision swin_t"].build()
    keys, params = list(stock.state_dict()), [id(p) for p in stock.parameters()]
    patched, report = vkernels.patch(stock, backend="triton", report=True)
    paths = [path for path, module in stock.named_modules() if type(module) is ShiftedWindowAttention]
    assert [path for path, what in report if "windows" in what] == paths and len(paths) == 2
    assert patched is stock and list(patched.state_dict()) == keys and [id(p) for p in patched.parameters()] == params
    assert vkernels.patch(patched, report=True)[1] == []  # patched before: nothing to do


def test_transformers_registry_implementation_and_patch():
    transformers = pytest.importorskip("transformers")
    device = device_for("triton")
    patch_module.transformers.register_attention()
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=16, patch_size=8)
    chosen = transformers.ViTModel._from_config(config, attn_implementation="vkernels_triton").to(device).eval()
    assert chosen.config._attn_implementation == "vkernels_triton"
    stock = transformers.ViTModel._from_config(config, attn_implementation="sdpa").to(device).eval()
    stock.load_state_dict(chosen.state_dict())
    patched, report = vkernels.patch(copy.deepcopy(stock), backend="triton", report=True)
    assert report == [("", "transformers ViTModel: attn_implementation 'sdpa' -> 'vkernels_triton' (AttentionInterface)"),
                      ("embeddings.patch_embeddings.projection", "Conv2d -> vkernels.nn.Conv2dAct")]
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        expected, exact = stock(x).last_hidden_state, copy.deepcopy(stock).double()(x.double()).last_hidden_state
        for model in (chosen, patched):  # the longest sum: the 32-wide projections
            assert_as_accurate(model(x).last_hidden_state, expected, exact, rounding_floor(torch.float32, 32))
    flash = transformers.ViTModel._from_config(config, attn_implementation="eager")
    flash.config._attn_implementation = "flex_attention"  # chosen by the user: patch says why it leaves it
    assert vkernels.patch(flash, report=True)[1].left == [("", "attn_implementation 'flex_attention' was chosen for this model: left as it is")]


def test_routed_sdpa_with_a_learned_bias_under_compile():
    """timm BEiT's attention (relative position bias table) patched, under torch.compile(fullgraph=True):
    the routing mode and the bias gradient hold, and match eager."""
    pytest.importorskip("timm")
    from timm.models.beit import Attention

    device = device_for("triton")
    torch._dynamo.reset()
    module = attention_coverage.perturbed(Attention(16, num_heads=2, window_size=(3, 3))).to(device).train()
    exact = copy.deepcopy(module).double()  # stock, in float64
    patched = vkernels.patch(module, backend="triton")
    x = torch.randn(2, 10, 16, device=device)  # 3 x 3 patches + class token
    compiled = torch.compile(patched, fullgraph=True)
    results = []
    for run, model, inputs in ((compiled, module, x), (patched, module, x), (exact, exact, x.double())):
        model.zero_grad()
        out = run(inputs)
        out.square().sum().backward()
        results.append({"output": out.detach(), "bias grad": model.relative_position_bias_table.grad.clone()})
    # compiled as accurate as eager against float64; the longest sum: the 16-wide projections
    assert_as_accurate(*results, rounding_floor(torch.float32, 16))
    assert results[1]["bias grad"].abs().sum() > 0


def test_rotation_moves_into_the_kernels(monkeypatch):
    """The patched rotary models never call their library's rotation (made to fail here), the stock
    ones do: q and k reach the kernels unrotated, with the tables."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import timm.models.eva
    from transformers.models import qwen2_5_vl

    device = device_for("triton")

    def rotation_ran(*args, **kwargs):
        raise AssertionError("the library's rotation ran")

    models = [attention_coverage.ZOO_BY_NAME[name].build() for name in
              ("timm DINOv3 ViT-S/16 (RoPE, 4 registers)", "transformers Qwen2.5-VL vision tower")]
    models = [(model.to(device), {k: v.to(device) for k, v in inputs.items()}) for model, inputs in models]
    patched = [vkernels.patch(copy.deepcopy(model), backend="triton") for model, _ in models]
    monkeypatch.setattr(timm.models.eva, "apply_rot_embed_cat", rotation_ran)
    monkeypatch.setattr(qwen2_5_vl.modeling_qwen2_5_vl, "apply_rotary_pos_emb_vision", rotation_ran)
    with torch.no_grad():
        for (stock, inputs), model in zip(models, patched):
            model.eval()(**inputs)
            with pytest.raises(AssertionError, match="rotation ran"):
                stock.eval()(**inputs)
