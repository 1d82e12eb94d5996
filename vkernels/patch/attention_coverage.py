"""How much of each zoo model's attention ``vkernels.patch`` sends through vkernels ops, and how close
the patched model stays to the stock one.

    python -m vkernels.patch.attention_coverage [--only REGEX] [--backend triton] [--markdown]

For every model of ``ZOO`` (small configs, random weights, built offline): ``patch(model)`` on a
copy (every parameter perturbed first, so that none is zero), then in eval mode (a forward under no_grad) and in train mode (a forward and a backward of a
fixed random projection of the output) the share of the attention FLOPs that vkernels ops computed,
and the relative errors of the patched and of the stock model in float32 against the stock model in
float64: of the output in eval mode; in train mode, of all parameter gradients together and of the
relative-position bias parameters' alone.

Attention FLOPs are counted per dispatched op from its shapes, algorithmically (forward QK^T and PV:
2 B H Lq Lk (E + Ev); backward twice that) whichever op computes them: vkernels' attention ops
(packed ones per sequence, from cu_seqlens), aten's SDPA ops and batched matmuls (aten.bmm; in these
models only unpatched explicit attention uses them). Without a GPU the Triton kernels run in the
interpreter: minutes, not seconds.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vkernels


def _attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    return 2 * (query.numel() // query.shape[-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def _packed_attention_flops(query: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor) -> int:
    """Of a packed (total, H, E) batch: sum over its sequences of 2 H Lq Lk (E + Ev)."""
    lengths_q, lengths_k = (t.diff().tolist() for t in (cu_seqlens_q, cu_seqlens_k))
    pairs = sum(lq * lk for lq, lk in zip(lengths_q, lengths_k))
    return 2 * query.shape[1] * pairs * (query.shape[-1] + value.shape[-1])


class AttentionFlops(TorchDispatchMode):
    """Counts attention FLOPs of the ops dispatched inside it: ``.vkernels`` by vkernels' ops,
    ``.stock`` by aten's SDPA ops and batched matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.vkernels = 0
        self.stock = 0

    @property
    def share(self) -> float:
        """vkernels' share of the attention FLOPs (NaN when there were none)."""
        total = self.vkernels + self.stock
        return self.vkernels / total if total else math.nan

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("vkernels::varlen_attention_backward_"):
            self.vkernels += 2 * _packed_attention_flops(args[1], args[3], *args[6:8])
        elif name.startswith("vkernels::varlen_attention_"):
            self.vkernels += _packed_attention_flops(args[0], args[2], *args[3:5])
        elif name.startswith("vkernels::attention_backward_"):
            self.vkernels += 2 * _attention_flops(*args[1:4])
        elif name.startswith("vkernels::attention_"):
            self.vkernels += _attention_flops(*args[:3])
        elif name.startswith("aten::_scaled_dot_product") and name.endswith("_backward"):
            self.stock += 2 * _attention_flops(*args[1:4])
        elif name.startswith("aten::_scaled_dot_product"):
            self.stock += _attention_flops(*args[:3])
        elif name == "aten::bmm":
            batch, rows, inner = args[0].shape
            self.stock += 2 * batch * rows * inner * args[1].shape[-1]
        return func(*args, **(kwargs or {}))


class ZooModel(NamedTuple):
    name: str
    build: Callable[[], tuple[torch.nn.Module, dict]]  # a fresh fp32 model on the CPU, and its inputs
    output: Callable[[torch.nn.Module, dict], torch.Tensor]
    note: str = ""  # why some attention stays stock at run time


def _call(model, inputs):
    return model(**inputs)


def _timm(model_name: str, size: int, **kwargs) -> Callable:
    def build():
        import timm

        # no dropout or drop-path: train mode must compute the same function in every run
        model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=size, drop_path_rate=0.0, **kwargs)
        return model, {"x": torch.randn(2, 3, size, size)}

    return build


def _torchvision_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    model.heads = torch.nn.Identity()  # torchvision zero-initialises the classifier
    return model, {"x": torch.randn(2, 3, 32, 32)}


def _torchvision_swin(v2: bool):
    def build():
        from torchvision.models import swin_transformer as swin

        blocks = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
        # one stage of 2 x 2 windows of 4 x 4 tokens, shifted in its second block
        model = swin.SwinTransformer([4, 4], 32, [2], [2], [4, 4], stochastic_depth_prob=0.0, **blocks)
        model.head = torch.nn.Identity()
        return model, {"x": torch.randn(2, 3, 32, 32)}

    return build


def _open_clip():
    import open_clip

    vision = open_clip.model.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return model, {"image": torch.randn(2, 3, 32, 32), "text": torch.randint(0, 50, (2, 8))}


def _features(model, inputs):
    """Both towers' embeddings of CLIP-style models, side by side."""
    out = model(**inputs)
    if isinstance(out, dict) and "image_features" in out:  # open_clip
        return torch.cat([out["image_features"], out["text_features"]], -1)
    if isinstance(out, tuple):
        return torch.cat(out[:2], -1)
    return torch.cat([out.image_embeds, out.text_embeds], -1)


def _hf_vision(config_name: str, model_name: str, size: int, patch: int):
    def build():
        import transformers

        config = getattr(transformers, config_name)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, image_size=size, patch_size=patch)
        return getattr(transformers, model_name)(config), {"pixel_values": torch.randn(2, 3, size, size)}

    return build


def _hf_two_towers(config_name: str, model_name: str):
    def build():
        import transformers

        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        tokens = dict(vocab_size=50, max_position_embeddings=8, bos_token_id=0, pad_token_id=1, eos_token_id=2)
        towers = dict(text_config=dict(small, **tokens),
                      vision_config=dict(small, image_size=32, patch_size=8))
        config = getattr(transformers, config_name)(**towers, **({"projection_dim": 16} if config_name == "CLIPConfig" else {}))
        padding = torch.ones(2, 8, dtype=torch.long)
        padding[1, 5:] = 0  # a padded second sentence: the text mask carries padding
        inputs = {"input_ids": torch.randint(1, 50, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
        if config_name == "CLIPConfig":
            inputs["attention_mask"] = padding
        return getattr(transformers, model_name)(config), inputs

    return build


def _last_hidden_state(model, inputs):
    return model(**inputs).last_hidden_state


def _qwen_vision_tower(version: str):
    """A Qwen2-VL / Qwen2.5-VL vision tower (2 blocks, width 32, 2 heads, 2 x 2 patches) and the
    patches of two images of 8 x 8 and 4 x 6 patches, packed: what the VLM hands its tower. Qwen2.5-VL's
    first block attends windows of 4 x 4 patches, its second the whole images."""
    def build():
        import transformers
        from transformers.models import qwen2_5_vl, qwen2_vl

        patches = dict(patch_size=2, temporal_patch_size=1, spatial_merge_size=2, in_channels=3)
        if version == "2":
            config = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=32, mlp_ratio=2,
                                                      **patches)
            tower = qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel._from_config(config)
        else:
            config = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                                         out_hidden_size=32, window_size=8, fullatt_block_indexes=[1],
                                                         **patches)
            tower = qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
        grid_thw = torch.tensor([[1, 8, 8], [1, 4, 6]])
        return tower, {"hidden_states": torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 2), "grid_thw": grid_thw}

    return build


def _naflexvit_rope():
    """timm naflexvit with axial RoPE in its native-resolution mode: two images of 3 x 2 and 2 x 2
    patches, padded to one sequence with a patch-validity mask and per-image rope tables."""
    import timm

    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, num_classes=0, embed_dim=32, depth=2,
                              num_heads=2, rope_type="axial", drop_path_rate=0.0)
    coords = torch.tensor([[(y, x) for y in range(3) for x in range(2)],
                           [(y, x) for y in range(2) for x in range(2)] + [(0, 0), (0, 0)]])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return model, {"x": torch.randn(2, 6, 16 * 16 * 3), "patch_coord": coords, "patch_valid": valid}


ZOO = [
    ZooModel("timm ViT-Ti/16", _timm("vit_tiny_patch16_224", 32, depth=2), _call),
    ZooModel("timm DeiT-Ti/16 distilled", _timm("deit_tiny_distilled_patch16_224", 32, depth=2), _call),
    ZooModel("timm BEiT (relative position bias)", _timm("beit_base_patch16_224", 32, depth=2, embed_dim=64, num_heads=2), _call),
    ZooModel("timm EVA-02-Ti (RoPE)", _timm("eva02_tiny_patch14_224", 28, depth=2), _call),
    ZooModel("timm DINOv3 ViT-S/16 (RoPE, 4 registers)", _timm("vit_small_patch16_dinov3", 32, depth=2, embed_dim=64,
                                                               num_heads=2), _call),
    ZooModel("timm naflexvit (axial RoPE, two sizes)", _naflexvit_rope, _call),
    ZooModel("timm DINOv2 ViT-S/14, 4 registers", _timm("vit_small_patch14_reg4_dinov2", 28, depth=2, embed_dim=64,
                                                        num_heads=2), _call),
    ZooModel("timm Swin-T", _timm("swin_tiny_patch4_window7_224", 32, window_size=4, depths=(2,), num_heads=(2,),
                                  embed_dim=32), _call),
    ZooModel("timm SwinV2-T", _timm("swinv2_tiny_window8_256", 32, window_size=4, depths=(2,), num_heads=(2,),
                                    embed_dim=32), _call),
    ZooModel("torchvision vit_b_16", _torchvision_vit, _call),
    ZooModel("torchvision swin_t", _torchvision_swin(v2=False), _call),
    ZooModel("torchvision swin_v2_t", _torchvision_swin(v2=True), _call),
    ZooModel("open_clip CLIP, both towers", _open_clip, _features),
    ZooModel("transformers ViTModel", _hf_vision("ViTConfig", "ViTModel", 32, 8), _last_hidden_state),
    ZooModel("transformers CLIPModel", _hf_two_towers("CLIPConfig", "CLIPModel"), _features),
    ZooModel("transformers SiglipModel", _hf_two_towers("SiglipConfig", "SiglipModel"), _features,
             "the vision tower's pooling head calls nn.MultiheadAttention with need_weights=True (the default) "
             "and drops the weights, which the kernels never form: its one-query attention runs torch's"),
    ZooModel("transformers Dinov2Model", _hf_vision("Dinov2Config", "Dinov2Model", 28, 14), _last_hidden_state),
    ZooModel("transformers Qwen2-VL vision tower", _qwen_vision_tower("2"), _last_hidden_state),
    ZooModel("transformers Qwen2.5-VL vision tower", _qwen_vision_tower("2.5"), _last_hidden_state),
]
ZOO_BY_NAME = {model.name: model for model in ZOO}
# parameters holding relative-position biases (tables, or v2's MLP of coordinates)
BIAS_PARAMETER = re.compile(r"relative_position_bias_table|cpb_mlp|rel_pos")


class Coverage(NamedTuple):
    name: str
    eval_share: float  # of attention FLOPs through vkernels ops, eval-mode forward
    train_share: float  # forward and backward in train mode
    # relative errors against the stock model in float64, each (patched, stock) in float32:
    eval_error: tuple[float, float]  # of the output, eval mode
    grad_error: tuple[float, float]  # of all parameter gradients together, train mode
    bias_grad_error: tuple[float, float]  # of the relative-position bias parameters' gradients (NaN: none)
    left: list[tuple[str, str]]  # patch's report.left: what it knew and left stock, and why
    note: str  # the zoo's note on attention that stays stock at run time


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


def _gradients(model, pattern=None) -> torch.Tensor:
    grads = [p.grad.flatten() for name, p in model.named_parameters()
             if p.grad is not None and (pattern is None or pattern.search(name))]
    return torch.cat(grads) if grads else torch.zeros(0)


def run_modes(entry: ZooModel, model: torch.nn.Module, inputs: dict, weights: torch.Tensor | None = None):
    """(eval output, train-mode parameter gradients of sum(output * weights), the bias parameters'
    gradients, weights) of ``model`` (its mode is left in train)."""
    with torch.no_grad():
        output = entry.output(model.eval(), inputs)
    model.train().zero_grad()
    train_output = entry.output(model, inputs)
    if weights is None:
        weights = torch.randn(train_output.shape, dtype=train_output.dtype, device=train_output.device)
    weights = weights.to(train_output.dtype)
    (train_output * weights).sum().backward()
    return output, _gradients(model), _gradients(model, BIAS_PARAMETER), weights


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter plus N(0, 0.05^2) noise: zero-initialised layer scales, post-norms (Swin v2) and
    heads would otherwise hide attention from the outputs and gradients compared."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    return model


def measure(entry: ZooModel, backend: str | None = "triton", seed: int = 0,
            device: torch.device | str = "cpu") -> tuple[Coverage, dict]:
    """The coverage row of one model on ``device``, and the results ("stock", "patched" in float32,
    "float64": the stock model's) that its errors compare, for tests to bound."""
    torch.manual_seed(seed)
    stock, inputs = entry.build()
    stock = perturbed(stock).to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    patched, report = vkernels.patch(copy.deepcopy(stock), backend=backend, report=True)
    stock_results = run_modes(entry, stock, inputs)
    counters = AttentionFlops(), AttentionFlops()
    with torch.no_grad(), counters[0]:
        output = entry.output(patched.eval(), inputs)
    patched.train().zero_grad()
    with counters[1]:
        train_output = entry.output(patched, inputs)
        (train_output * stock_results[3]).sum().backward()
    exact_inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    exact = run_modes(entry, copy.deepcopy(stock).double(), exact_inputs, stock_results[3].double())
    results = {"stock": stock_results[:3], "patched": (output, _gradients(patched), _gradients(patched, BIAS_PARAMETER)),
               "float64": exact[:3]}
    errors = [tuple(_relative_error(results[name][i], exact[i]) if exact[i].numel() else math.nan
                    for name in ("patched", "stock")) for i in range(3)]
    row = Coverage(entry.name, counters[0].share, counters[1].share, *errors, list(report.left), entry.note)
    return row, results


def _format(value: float | tuple[float, float], percent: bool = False) -> str:
    if isinstance(value, tuple):
        return "-" if all(map(math.isnan, value)) else " / ".join(map(_format, value))
    if math.isnan(value):
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.1e}"


def format_table(rows: list[Coverage], markdown: bool = False) -> str:
    header = ["model", "vkernels share of attention FLOPs, eval", "train (fwd+bwd)",
              "output rel. error vs float64, eval (patched / stock float32)", "param-grad rel. error, train (same)",
              "bias-table grad rel. error (same)", "stock attention left, and why"]
    lines = [[row.name, _format(row.eval_share, True), _format(row.train_share, True), _format(row.eval_error),
              _format(row.grad_error), _format(row.bias_grad_error),
              "; ".join([f"{path}: {why}" for path, why in row.left] + ([row.note] if row.note else [])) or "-"]
             for row in rows]
    if markdown:
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines])
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)) for cells in [header, *lines])


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="regex on model names")
    parser.add_argument("--backend", default="triton", help="the backend patch() is given (default triton)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    rows = []
    for entry in ZOO:
        if re.search(args.only, entry.name):
            rows.append(measure(entry, args.backend, device="cuda" if torch.cuda.is_available() else "cpu")[0])
            print(f"measured {entry.name}", flush=True)
    print(format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    import os
    import sys

    from vkernels.bench.__main__ import reexec_with_triton_interpreter_if_no_gpu

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reexec_with_triton_interpreter_if_no_gpu()
    sys.exit(main())
