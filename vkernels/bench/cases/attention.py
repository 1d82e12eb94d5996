"""Scaled dot-product attention at the issue's shapes on CUDA (bf16), and at tiny fp32 shapes on CPU.

The baseline is F.scaled_dot_product_attention: torch picks its fastest backend (flash, cuDNN,
memory-efficient or math) for each input. FLOPs, as in the FlashAttention benchmarks: two matmuls
of 2·B·H·Lq·Lk·D each forward, 2.5× that for the backward (five matmuls), halved when causal.

Learned biases (``BIAS_SHAPES``): Swin-T's window attention (windows as batch entries, a float32
relative-position bias per head, learned, plus the shift mask per window) and BEiT's (a learned
(1, H, L, L) bias), forward and forward+backward with the bias gradient. The baseline is what the
models hand SDPA: one float mask, the bias plus the window mask expanded to (B·nW, H, L, L) as timm's
fused Swin path does; ``flex`` is FlexAttention (torch.compile'd, GPU only: no CPU backward) with the
bias and mask as captured buffers in its score_mod.

Packed images (``PACKED_SHAPES``): images of different sizes as one token sequence with cu_seqlens
and 2-D RoPE, as native-resolution encoders (Qwen2-VL, NaViT) run them, forward and forward+backward.
The baseline is what Hugging Face's Qwen2-VL tower does without FlashAttention-2: a separate rotary
step (fp32, rounded back) and one SDPA call per image; ``padded`` rotates, pads every image to the
longest and runs one SDPA call with a key-padding mask; ``fa2`` is FlashAttention-2's
``flash_attn_varlen_func`` after its own rotary kernel, where flash-attn is installed.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

import vkernels
from vkernels.bench.case import DTYPE_NAMES, Case, dtype_name, forward_backward, forward_only, tolerance, vkernels_impls
from vkernels.rotary import apply_rotary
from vkernels.shapes import attention_shape_class


class Shape(NamedTuple):
    label: str  # where the shape comes from
    batch: int
    heads: int
    length: int  # Lq = Lk
    head_dim: int
    causal: bool = False
    key_padding: bool = False  # a bool (B, 1, 1, L) mask with a random number of padded keys per sample
    headline: bool = False  # timed in bench/gpu_run.sh's headline stage: one shape per shape class


CUDA_SHAPES = [
    # FlashAttention-3's anchors: 16k tokens per batch, heads × head dim = 2048.
    Shape("anchor", 8, 32, 2048, 64, headline=True),
    Shape("anchor", 8, 32, 2048, 64, causal=True),
    *(Shape("anchor", 8, 16, 2048, 128, causal) for causal in (False, True)),
    Shape("ViT-B/16@224", 256, 12, 197, 64, headline=True),
    Shape("ViT-B/16@384", 64, 12, 577, 64),  # batch 64, not 256: 4× fewer tokens keeps memory sane
    Shape("ViT-H/14", 128, 16, 257, 80),
    Shape("ViT-B/16@224 key-padding", 256, 12, 197, 64, key_padding=True),  # where SDPA leaves flash
]
CPU_SHAPES = [  # tiny: the Triton interpreter runs each program in numpy
    Shape("tiny", 1, 2, 50, 32, headline=True),
    Shape("tiny", 1, 2, 50, 32, causal=True),
    Shape("tiny", 1, 2, 50, 32, key_padding=True),
]


class BiasShape(NamedTuple):
    label: str
    images: int
    windows: int  # > 1: Swin windows of images, batched, with a shift mask per window
    heads: int
    length: int
    head_dim: int


CUDA_BIAS_SHAPES = [
    BiasShape("Swin-T stage 1 shifted windows", 128, 64, 3, 49, 32),
    BiasShape("Swin-T stage 3 shifted windows", 128, 4, 12, 49, 32),
    BiasShape("BEiT-B/16@224 relative position bias", 128, 1, 12, 197, 64),
]
CPU_BIAS_SHAPES = [
    BiasShape("tiny shifted windows", 1, 4, 2, 16, 16),
    BiasShape("tiny relative position bias", 1, 1, 2, 50, 32),
]


class PackedShape(NamedTuple):
    label: str
    images: tuple[tuple[int, int], ...]  # (rows, columns) of patches per image
    heads: int
    head_dim: int
    headline: bool = False


CUDA_PACKED_SHAPES = [  # 256, 1024, 2304 and 4096 tokens
    PackedShape("4 images 256-4096 tokens", ((16, 16), (32, 32), (48, 48), (64, 64)), 16, 80, headline=True),
    PackedShape("4 images 256-4096 tokens", ((16, 16), (32, 32), (48, 48), (64, 64)), 16, 64),
]
CPU_PACKED_SHAPES = [PackedShape("tiny 3 images", ((2, 3), (3, 5), (4, 7)), 2, 16)]


def cases(device: torch.device, max_autotune: bool) -> list[Case]:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    return [attention_case(shape, dtype, device, direction)
            for shape in (CUDA_SHAPES if on_gpu else CPU_SHAPES)
            for direction in ("fwd", "fwd+bwd")] + [
        bias_case(shape, dtype, device, direction)
        for shape in (CUDA_BIAS_SHAPES if on_gpu else CPU_BIAS_SHAPES)
        for direction in ("fwd", "fwd+bwd")] + [
        packed_case(shape, dtype, device, direction)
        for shape in (CUDA_PACKED_SHAPES if on_gpu else CPU_PACKED_SHAPES)
        for direction in ("fwd", "fwd+bwd")]


def attention_case(shape: Shape, dtype: torch.dtype, device: torch.device, direction: str) -> Case:
    batch, heads, length, head_dim = shape.batch, shape.heads, shape.length, shape.head_dim
    training = direction == "fwd+bwd"
    args = ("query", "key", "value", "attn_mask") if shape.key_padding else ("query", "key", "value")

    def make_inputs() -> dict[str, torch.Tensor]:
        qkv = {name: torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype).requires_grad_(training)
               for name in ("query", "key", "value")}
        inputs = {**qkv, "grad_out": torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)}
        if shape.key_padding:  # True = attend; every sample keeps at least half its keys
            kept = torch.randint(length // 2, length + 1, (batch, 1, 1, 1), device=device)
            inputs["attn_mask"] = torch.arange(length, device=device) < kept
        return inputs

    wrap = functools.partial(forward_backward if training else forward_only, args=args)
    stock = functools.partial(F.scaled_dot_product_attention, is_causal=shape.causal)
    impls, skipped = vkernels_impls(
        "attention", lambda backend: functools.partial(vkernels.attention, is_causal=shape.causal, backend=backend), wrap)

    attributes = " causal" if shape.causal else ""
    attributes += " mask(B,1,1,L)" if shape.key_padding else ""
    name = f"attention {shape.label} B{batch} H{heads} L{length} D{head_dim}{attributes} {DTYPE_NAMES[dtype]} {direction}"
    flops = _flops(batch * heads, length, head_dim, training) / (2 if shape.causal else 1)
    return _case(name, direction, make_inputs, {"pytorch": wrap(stock), **impls}, skipped, flops, dtype, length, head_dim,
                 shape.headline)


def _flops(batch: int, length: int, head_dim: int, training: bool) -> float:
    return 4 * batch * length * length * head_dim * (3.5 if training else 1)


def _case(name, direction, make_inputs, impls, skipped, flops, dtype, length, head_dim, headline=False,
          op="attention") -> Case:
    return Case(name=name, family="attention", direction=direction, make_inputs=make_inputs, impls=impls,
                skipped=skipped, flops=int(flops), tolerance=tolerance(dtype), op=op, dtype=dtype_name(dtype),
                shape_class=attention_shape_class((length, head_dim), (length, head_dim)), headline=headline)


def bias_case(shape: BiasShape, dtype: torch.dtype, device: torch.device, direction: str) -> Case:
    images, windows, heads, length, head_dim = shape.images, shape.windows, shape.heads, shape.length, shape.head_dim
    batch = images * windows
    training = direction == "fwd+bwd"
    args = ("query", "key", "value", "window_mask", "bias")

    def make_inputs() -> dict[str, torch.Tensor]:
        inputs = {name: torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype).requires_grad_(training)
                  for name in ("query", "key", "value")}
        inputs["grad_out"] = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
        inputs["bias"] = torch.randn(heads, length, length, device=device).requires_grad_(training)  # float32, learned
        # Swin's shift mask: 0 within a region, -100 across; one window in four crosses regions here
        crossing = (torch.rand(windows, 1, length, device=device) < 0.25) & (torch.rand(windows, length, 1, device=device) < 0.5)
        inputs["window_mask"] = torch.where(crossing, -100.0, 0.0).to(device)
        return inputs

    def stock(query, key, value, window_mask, bias):  # timm's fused path: one (B·nW, H, L, L) float mask
        mask = (bias + window_mask.view(1, windows, 1, length, length)).reshape(batch, heads, length, length)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype))

    def ours(backend):
        def run(query, key, value, window_mask, bias):
            q, k, v = (t.view(images, windows, heads, length, head_dim) for t in (query, key, value))
            out = vkernels.attention(q, k, v, window_mask.view(windows, 1, length, length), attn_bias=bias, backend=backend)
            return out.view(batch, heads, length, head_dim)
        return run

    wrap = functools.partial(forward_backward if training else forward_only, args=args)
    impls, skipped = vkernels_impls("attention", ours, wrap)
    if device.type == "cuda":
        impls["flex"] = wrap(_flex_with_bias(windows))
    else:
        skipped["flex"] = "FlexAttention has no CPU backward, and its compiled CPU forward is not what we compare to"
    name = f"attention+bias {shape.label} B{images}x{windows} H{heads} L{length} D{head_dim} {DTYPE_NAMES[dtype]} {direction}"
    flops = _flops(batch * heads, length, head_dim, training)
    return _case(name, direction, make_inputs, {"pytorch": wrap(stock), **impls}, skipped, flops, dtype, length, head_dim)


def _flex_with_bias(windows: int):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def run(query, key, value, window_mask, bias):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx] + window_mask[b % windows, q_idx, kv_idx]

        return compiled(query, key, value, score_mod=score_mod)

    return run


def packed_case(shape: PackedShape, dtype: torch.dtype, device: torch.device, direction: str) -> Case:
    lengths = [rows * cols for rows, cols in shape.images]
    total, heads, head_dim = sum(lengths), shape.heads, shape.head_dim
    training = direction == "fwd+bwd"
    args = ("query", "key", "value", "cu_seqlens", "cos", "sin")
    bounds = [0, *itertools.accumulate(lengths)]

    def make_inputs() -> dict[str, torch.Tensor]:
        inputs = {name: torch.randn(total, heads, head_dim, device=device, dtype=dtype).requires_grad_(training)
                  for name in ("query", "key", "value")}
        inputs["grad_out"] = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
        inputs["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32, device=device)
        positions = torch.cat([torch.cartesian_prod(torch.arange(rows), torch.arange(cols)) for rows, cols in shape.images])
        inputs["cos"], inputs["sin"] = vkernels.rotary_tables(positions.to(device), head_dim)
        return inputs

    def per_image(query, key, value, cu_seqlens, cos, sin):  # Hugging Face's Qwen2-VL tower without FA2
        query, key = (apply_rotary(t, cos[:, None], sin[:, None]) for t in (query, key))
        outs = [F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (query, key, value)))
                for start, end in zip(bounds, bounds[1:])]
        return torch.cat([out.transpose(0, 1) for out in outs])

    def padded(query, key, value, cu_seqlens, cos, sin):
        query, key = (apply_rotary(t, cos[:, None], sin[:, None]) for t in (query, key))
        longest = max(lengths)
        keep = torch.arange(longest, device=device) < torch.tensor(lengths, device=device)[:, None]  # (images, longest)
        batch = [t.new_zeros(len(lengths), longest, heads, head_dim).masked_scatter(keep[..., None, None], t)
                 for t in (query, key, value)]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in batch), attn_mask=keep[:, None, None])
        return out.transpose(1, 2)[keep]

    def ours(backend):
        def run(query, key, value, cu_seqlens, cos, sin):
            return vkernels.varlen_attention(query, key, value, cu_seqlens, cu_seqlens, max(lengths), max(lengths),
                                             rotary=(cos, sin), backend=backend)
        return run

    wrap = functools.partial(forward_backward if training else forward_only, args=args)
    impls, skipped = vkernels_impls("varlen_attention", ours, wrap)
    impls["padded"] = wrap(padded)
    fa2 = _flash_attention_2(max(lengths))
    if isinstance(fa2, str):
        skipped["fa2"] = fa2
    else:
        impls["fa2"] = wrap(fa2)
    name = (f"varlen attention+rope {shape.label} ({'/'.join(map(str, lengths))}) H{heads} D{head_dim} "
            f"{DTYPE_NAMES[dtype]} {direction}")
    flops = sum(_flops(heads, length, head_dim, training) for length in lengths)
    return _case(name, direction, make_inputs, {"pytorch": wrap(per_image), **impls}, skipped, flops, dtype,
                 max(lengths), head_dim, shape.headline, op="varlen_attention")


def _flash_attention_2(longest: int):
    """FlashAttention-2's varlen attention after its own rotary kernel (the packed batch as one
    sequence, so that each token has its own 2-D table row), or why it cannot run here."""
    try:
        from flash_attn import flash_attn_varlen_func
        from flash_attn.layers.rotary import apply_rotary_emb
    except ImportError as error:
        return f"flash-attn is not installed ({error})"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU"

    def run(query, key, value, cu_seqlens, cos, sin):
        half = cos.shape[-1] // 2  # flash-attn takes the first half of rotate-half tables
        query, key = (apply_rotary_emb(t[None], cos[:, :half], sin[:, :half])[0] for t in (query, key))
        return flash_attn_varlen_func(query, key, value, cu_seqlens, cu_seqlens, longest, longest)

    return run
