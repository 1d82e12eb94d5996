"""Rotary embeddings: vkernels.rotary_tables against the models' own tables, and vkernels.attention
with rotary=(cos, sin) in the kernels against rotating first and attending after, in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vkernels
from support import (KERNEL_BACKENDS, assert_as_accurate, backend_case_params, device_for, relative_error,
                     rounding_floor, tolerance)
from test_varlen_attention import rotated

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def grid_positions(height: int, width: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], -1)


def test_tables_match_qwen2_vl():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding

    config = transformers.Qwen2VLVisionConfig(embed_dim=64, num_heads=2)  # head dim 32
    positions = grid_positions(3, 5)
    expected = Qwen2VLVisionRotaryEmbedding(config)(torch.zeros(1), positions)
    for ours, theirs in zip(vkernels.rotary_tables(positions, 32, config.rope_parameters["rope_theta"]), expected):
        assert ours.shape == theirs.shape and relative_error(ours, theirs) < 1e-6


def test_tables_match_timm_eva02_and_dinov3():
    pytest.importorskip("timm")
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3

    # EVA-02: index grid scaled to the pretraining grid (16 x 16), interleaved layout
    eva = RotaryEmbeddingCat(32, in_pixels=False, feat_shape=[3, 5], ref_feat_shape=[16, 16])
    sin, cos = eva.get_embed().chunk(2, -1)
    scaled = grid_positions(3, 5) * torch.tensor([16 / 3, 16 / 5])
    for ours, theirs in zip(vkernels.rotary_tables(scaled, 32, interleaved=True), (cos, sin)):
        assert relative_error(ours, theirs) < 1e-6
    # DINOv3: 2 pi times the patch centres in [-1, 1], rotate-half, temperature 100
    sin, cos = RotaryEmbeddingDinoV3(32, temperature=100).get_embed(shape=(3, 5)).chunk(2, -1)
    centres = (grid_positions(3, 5) + 0.5) / torch.tensor([3, 5]) * 2 - 1
    for ours, theirs in zip(vkernels.rotary_tables(2 * math.pi * centres, 32, 100), (cos, sin)):
        assert relative_error(ours, theirs) < 1e-6


def test_rotary_tables_refuse_a_dim_the_axes_cannot_share():
    with pytest.raises(ValueError, match="multiple of 2 x axes"):
        vkernels.rotary_tables(grid_positions(2, 2), 30)


def reference(query, key, value, cos, sin, interleaved, **kwargs):
    """float64: rotate q and k over their last dims (tables broadcast over the leading ones; a (B, L, R)
    table is per batch entry, as Hugging Face's), then SDPA."""
    if cos.dim() == query.dim() - 1:
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)

    def rotate(x):
        flat = x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)  # (L, entries, D): rotated() is per token
        tables = [t.double().expand(*x.shape[:-1], t.shape[-1]).reshape(-1, x.shape[-2], t.shape[-1]).transpose(0, 1)
                  for t in (cos, sin)]
        return rotated(flat, *tables, interleaved).transpose(0, 1).reshape(x.shape)
    return F.scaled_dot_product_attention(rotate(query), rotate(key), value, **kwargs)


# name -> (q/k/v shape, table shape, interleaved, dtype (the Triton backend's; the CUDA kernels run
# every case in every dtype), extra kwargs)
TABLES = {
    "shared (L, R) rotate-half": ((2, 3, 20, 32), (20, 32), False, FP32, {}),
    "per batch (B, L, R) interleaved": ((2, 3, 20, 40), (2, 20, 40), True, FP16, {}),
    "per head (1, H, L, R), partial 16 of 24, causal": ((2, 3, 20, 24), (1, 3, 20, 16), False, FP32,
                                                        {"is_causal": True}),
    "shared, learned bias and key padding": ((2, 2, 17, 16), (17, 16), True, FP32, {"bias": (1, 2, 17, 17)}),
    # bf16: not in the Triton interpreter (GPU only there), in the CUDA emulator
    "per batch (B, L, R) rotate-half, ViT length, d80": ((2, 4, 197, 80), (2, 197, 80), False, BF16, {}),
}


@pytest.mark.parametrize("backend, dtype, case", backend_case_params(TABLES, lambda case: case[3]))
def test_attention_with_rotary_equals_rotate_then_attend(backend, dtype, case):
    """Output and gradients (q, k, v; a learned bias's too) against float64, as tests/test_attention.py
    bounds them (measured over 6 seeds against this reference: fp32 <= 2.8e-7, fp16 <= 4.9e-4; the
    CUDA kernels in every dtype, 10 seeds: fp32 <= 5.4e-7, fp16 <= 6.6e-4, bf16 <= 4.2e-3)."""
    device = device_for(backend)
    shape, table, interleaved, _, kwargs = case
    angles = torch.rand(table, device=device) * 12 - 6
    cos, sin = angles.cos(), angles.sin()
    leaves = [torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(3)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ours, theirs = {"is_causal": kwargs.get("is_causal", False)}, {"is_causal": kwargs.get("is_causal", False)}
    if "bias" in kwargs:
        bias = torch.randn(kwargs["bias"], device=device, requires_grad=True)
        padding = torch.rand(shape[0], 1, 1, shape[2], device=device) > 0.3
        padding[..., 0] = True
        ours.update(attn_mask=padding, attn_bias=bias)
        ref_bias = bias.detach().double().requires_grad_()
        theirs["attn_mask"] = ref_bias.masked_fill(~padding, float("-inf"))
    out = vkernels.attention(*leaves, rotary=(cos, sin), rotary_interleaved=interleaved, backend=backend, **ours)
    expected = reference(*ref_leaves, cos, sin, interleaved, **theirs)
    assert out.dtype == dtype and relative_error(out, expected) < tolerance(dtype)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves):
        assert relative_error(leaf.grad, ref_leaf.grad, floor=1.0) < 2 * tolerance(dtype), name
    if "bias" in kwargs:
        assert relative_error(bias.grad, ref_bias.grad) < 2 * tolerance(dtype)


def test_learned_tables_get_their_gradient():
    """Tables that require grad (RoPE-Mixed's learned frequencies) are applied before the kernels,
    which give them no gradient: the frequencies still get theirs. Output and gradients as accurate
    as stock PyTorch's against float64, plus the rounding floor of the 16-term dot products."""
    device = device_for("triton")
    frequencies = torch.rand(8, device=device)
    q, k, v = (torch.randn(1, 2, 12, 16, device=device) for _ in range(3))

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (frequencies, q, k, v)]
        angles = torch.arange(12, device=device)[:, None] * leaves[0]
        angles = torch.cat([angles, angles], -1)
        out = vkernels.attention(*leaves[1:], rotary=(angles.cos(), angles.sin()), backend=backend)
        grads = torch.autograd.grad(out.double().square().sum(), leaves[:2])
        return {"output": out.detach(), "frequencies' grad": grads[0], "q's grad": grads[1]}

    exact = run("torch", torch.float64)
    assert exact["frequencies' grad"].abs().sum() > 0
    assert_as_accurate(run("triton", FP32), run("torch", FP32), exact, rounding_floor(FP32, 16))


ROTARY_BAD = {
    "odd rotary_dim": ((6, 7), "must be even"),
    "rotary_dim > head dim": ((6, 10), "must be even"),
    "rows are not the positions": ((5, 8), "rows"),
    "tables do not broadcast over the batch": ((3, 6, 8), "do not broadcast"),
}


@pytest.mark.parametrize("case", ROTARY_BAD.values(), ids=ROTARY_BAD.keys())
def test_bad_rotary_tables_raise(case):
    shape, message = case
    q = torch.randn(2, 2, 6, 8, device=device_for("triton"))
    with pytest.raises(ValueError, match=message):
        vkernels.attention(q, q, q, rotary=(torch.rand(shape), torch.rand(shape)), backend="triton")
    with pytest.raises(ValueError, match="one length"):
        vkernels.attention(q, q[:, :, :5], q[:, :, :5], rotary=(torch.rand(6, 8),) * 2, backend="triton")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_with_rotary(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(1, 2, 2, 6, 16, device=device, requires_grad=True) for _ in range(3))
    cos, sin = (torch.rand(1, 2, 1, 6, 16, device=device) for _ in range(2))
    op = getattr(torch.ops.vkernels, f"attention_{backend}").default
    torch.library.opcheck(op, (q, k, v, None, None, True, 0.25, cos, sin, True))
