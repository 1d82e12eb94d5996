"""Attention through the libraries' own seam: ``F.scaled_dot_product_attention``.

A routed module keeps its class, state and forward; its forward runs inside a ``TorchFunctionMode``
that sends each ``F.scaled_dot_product_attention`` call to ``vkernels.attention`` (SDPA's arguments;
an additive mask that requires grad, such as BEiT's relative position bias, gets its gradient from
the kernels). The mode holds under ``torch.compile(fullgraph=True)``: Dynamo traces it and the graph
holds the vkernels op. In eager mode it costs one Python call per torch function the module's
forward makes. Calls with what the kernels lack (``dropout_p > 0`` in training, ``enable_gqa``) run
stock SDPA.

Routed here: every timm module with a ``fused_attn`` flag that is on (ViT, DeiT, DINOv2 with
registers, BEiT, EVA/EVA-02, DINOv3, RoPE ViTs, naflexvit, and the other timm families whose fused
path calls SDPA). timm's rotary attention (``EvaAttention``, ``AttentionRope``: EVA-02, DINOv3,
``vit_*_rope_*``, naflexvit with RoPE) moves its rotation into the kernels: its forward runs with
``rope=None`` and the mode gives the SDPA call the rope as ``rotary=`` tables, with identity rows
(cos 1, sin 0) for the prefix tokens timm leaves unrotated. timm's Swin has its own rule
(``vkernels.patch.swin``): its fused path adds the window mask to the bias at full (batch x windows)
size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vkernels.ops.attention import attention
from vkernels.patch.common import loaded_class, wrap_forward, wrapped_forward
from vkernels.patch.report import Left
from vkernels.rotary import apply_rotary

# timm's attention modules with a ``rope`` argument whose forward rotates q and k right before SDPA
ROTARY_ATTENTION = (("timm.models.eva", "EvaAttention"), ("timm.layers.attention", "AttentionRope"))


def sdpa_through_vkernels(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, *, rotary=None, rotary_interleaved=False, backend=None):
    """``F.scaled_dot_product_attention``'s arguments (and rotary tables for q and k), run by
    ``vkernels.attention`` when the kernels have what the call needs, else by stock SDPA."""
    if dropout_p > 0 or enable_gqa:
        if rotary is not None:
            query, key = (apply_rotary(t, *rotary, rotary_interleaved) for t in (query, key))
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return attention(query, key, value, attn_mask, is_causal=is_causal, scale=scale, rotary=rotary,
                     rotary_interleaved=rotary_interleaved, backend=backend)


class SdpaToVkernels(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` runs ``sdpa_through_vkernels`` on ``backend``,
    with ``rotary`` tables for q and k when given (``calls`` counts the SDPA calls)."""

    def __init__(self, backend: str | None = None, rotary=None, rotary_interleaved: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.rotary, self.rotary_interleaved = rotary, rotary_interleaved
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return sdpa_through_vkernels(*args, **kwargs, rotary=self.rotary,
                                         rotary_interleaved=self.rotary_interleaved, backend=self.backend)
        return func(*args, **kwargs)


def sdpa_routed_forward(module, backend, *args, **kwargs):
    """The module's own forward, its SDPA calls routed to vkernels."""
    with SdpaToVkernels(backend):
        return type(module).forward(module, *args, **kwargs)


def timm_rotary_tables(rope: torch.Tensor, prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's rope (sin and cos concatenated on the last dim, rows for the patch tokens only, broadcast
    right-aligned against (B, H, N, D)) as 4-D (cos, sin) tables with identity rows for the prefix
    tokens (class token, registers), which timm leaves unrotated."""
    sin, cos = rope.view((1,) * (4 - rope.dim()) + tuple(rope.shape)).chunk(2, -1)
    if prefix_tokens:
        sin, cos = (torch.cat([t.new_full((*t.shape[:-2], prefix_tokens, t.shape[-1]), fill), t], -2)
                    for t, fill in ((sin, 0.0), (cos, 1.0)))
    return cos, sin


def rotary_routed_forward(module, backend, x, rope=None, attn_mask=None, is_causal=False):
    """timm's EvaAttention / AttentionRope forward with the rotation in the kernels: their own forward
    with ``rope=None``, the mode handing their one SDPA call the rope as tables."""
    if rope is None or not module.fused_attn:
        return sdpa_routed_forward(module, backend, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    mode = SdpaToVkernels(backend, timm_rotary_tables(rope, module.num_prefix_tokens), not module.rotate_half)
    with mode:
        out = type(module).forward(module, x, rope=None, attn_mask=attn_mask, is_causal=is_causal)
    if mode.calls != 1:  # a timm forward that no longer ends in one SDPA call: its rotation would be lost
        raise RuntimeError(f"{type(module).__name__}'s forward called F.scaled_dot_product_attention {mode.calls} "
                           "times, not once: vkernels cannot move its rotation into the kernels")
    return out


def route_timm_attention(module, backend):
    if not type(module).__module__.startswith("timm.") or not hasattr(module, "fused_attn"):
        return None
    if wrapped_forward(module) is not None:
        return None  # patched before
    if not module.fused_attn:
        return Left("timm's fused_attn is off here (TIMM_FUSED_ATTN=0, or an experimental fused path): "
                    "its attention is explicit matmuls")
    if any(type(module) is loaded_class(*where) for where in ROTARY_ATTENTION):
        wrap_forward(module, rotary_routed_forward, backend)
        return module, (f"timm {type(module).__name__}: F.scaled_dot_product_attention -> vkernels.attention, "
                        "RoPE in the kernel")
    wrap_forward(module, sdpa_routed_forward, backend)
    return module, f"timm {type(module).__name__}: F.scaled_dot_product_attention -> vkernels.attention"
