"""Hugging Face transformers: vkernels as an attention implementation in transformers' own registry.

``register_attention()`` adds ``"vkernels"`` (the backend chosen per call) and ``"vkernels_triton"``,
``"vkernels_cuda"``, ``"vkernels_torch"`` to ``AttentionInterface`` (with sdpa's mask function in
``AttentionMaskInterface``), so that ``from_pretrained(..., attn_implementation="vkernels")`` and
``model.set_attn_implementation("vkernels")`` work for every model written against the interface
(ViT, CLIP, SigLIP, DINOv2, ...). ``vkernels.patch`` registers and switches a model it is handed.
The function mirrors transformers' sdpa one: what the kernels lack (dropout in training, grouped
query heads, softcapping) runs transformers' own sdpa function; a T5-style ``position_bias`` is the
kernels' ``attn_bias``, with its gradient.

Qwen2-VL's and Qwen2.5-VL's vision attention reach the registry with q and k already rotated, and,
unless the implementation's name says "flash", one call per image. Their forward is therefore
replaced on the instance (exact classes only): the fused qkv projection's q, k, v go to one
``varlen_attention`` call over the blocks' ``cu_seqlens`` (images; Qwen2.5-VL's windowed blocks pass
the windows' boundaries), with the 2-D RoPE tables rotating q and k in the kernels.
"""
from __future__ import annotations

import torch

from vkernels.ops.attention import attention, varlen_attention
from vkernels.patch.common import loaded_class, wrap_forward, wrapped_forward
from vkernels.patch.report import Left

IMPLEMENTATIONS = {"vkernels": None, "vkernels_triton": "triton", "vkernels_cuda": "cuda", "vkernels_torch": "torch"}
# implementations a model may come with that patch() switches: the ones computing plain attention
SWITCHED = ("eager", "sdpa")


def _attention_function(backend: str | None):
    def vkernels_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   is_causal=None, position_bias=None, **kwargs):
        """transformers' attention-function signature: query, key, value (B, H, L, E), mask (B, 1, Lq, Lk)
        bool or additive; returns ((B, Lq, H, E) output, no weights)."""
        if dropout > 0 or getattr(module, "num_key_value_groups", 1) > 1 or kwargs.get("softcap") is not None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, position_bias=position_bias, **kwargs)
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
        if is_causal and position_bias is not None:  # vkernels, like SDPA, takes no mask with is_causal
            attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
            is_causal = False
        out = attention(query, key, value, attention_mask, is_causal=is_causal, scale=scaling, attn_bias=position_bias,
                        backend=backend)
        return out.transpose(1, 2), None  # laid out (B, L, H, E) by the kernels: contiguous

    return vkernels_attention_forward


def register_attention() -> None:
    """Register the vkernels attention implementations with transformers (imports it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, backend in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _attention_function(backend))
        AttentionMaskInterface.register(name, sdpa_mask)


def transformers_attention_rule(module, backend):
    pretrained = loaded_class("transformers.modeling_utils", "PreTrainedModel")
    if pretrained is None or not isinstance(module, pretrained):
        return None
    name = next(name for name, chosen in IMPLEMENTATIONS.items() if chosen == backend)
    current = module.config._attn_implementation
    if current == name:
        return None  # patched before
    if current not in SWITCHED:
        return Left(f"attn_implementation {current!r} was chosen for this model: left as it is")
    if not module._can_set_attn_implementation():
        return Left(f"{type(module).__name__} does not route attention through transformers' AttentionInterface")
    register_attention()
    module.set_attn_implementation(name)
    return module, f"transformers {type(module).__name__}: attn_implementation {current!r} -> {name!r} (AttentionInterface)"


# vision attention modules whose forward is qkv -> rotate q, k (position_embeddings) -> attend within
# each cu_seqlens sequence -> proj
PACKED_VISION_ATTENTION = (("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
                           ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"))


def packed_vision_attention_forward(module, backend, hidden_states, cu_seqlens, position_embeddings=None,
                                    max_seqlen=None, **kwargs):
    """Qwen2-VL / Qwen2.5-VL vision attention as one varlen_attention call: hidden_states (tokens, C),
    each cu_seqlens sequence attended alone, q and k rotated by position_embeddings in the kernels."""
    if module.training and module.attention_dropout > 0:  # the kernels have no dropout
        return type(module).forward(module, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    tokens = hidden_states.shape[0]
    query, key, value = module.qkv(hidden_states).view(tokens, 3, module.num_heads, -1).unbind(1)
    out = varlen_attention(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=module.scaling,
                           rotary=position_embeddings, backend=backend)
    return module.proj(out.view(tokens, -1))


def packed_vision_attention_rule(module, backend):
    if not any(type(module) is loaded_class(*where) for where in PACKED_VISION_ATTENTION):
        return None
    if wrapped_forward(module) is not None:
        return None  # patched before
    wrap_forward(module, packed_vision_attention_forward, backend)
    return module, (f"transformers {type(module).__name__}: one vkernels.varlen_attention over cu_seqlens, "
                    "2-D RoPE in the kernel")
