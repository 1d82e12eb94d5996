"""Attention through the libraries' own seam: ``F.scaled_dot_product_attention``.

A routed module keeps its class, state and forward; its forward runs inside a ``TorchFunctionMode``
that sends each ``F.scaled_dot_product_attention`` call to ``vkernels.attention`` (SDPA's arguments;
an additive mask that requires grad, such as BEiT's relative position bias, gets its gradient from
the kernels). The mode holds under ``torch.compile(fullgraph=True)``: Dynamo traces it and the graph
holds the vkernels op. In eager mode it costs one Python call per torch function the module's
forward makes. Calls with what the kernels lack (``dropout_p > 0`` in training, ``enable_gqa``) run
stock SDPA.

Routed here: every timm module with a ``fused_attn`` flag that is on (ViT, DeiT, DINOv2 with
registers, BEiT, EVA/EVA-02 with RoPE applied before the call, and the other timm families whose
fused path calls SDPA). timm's Swin has its own rule (``vkernels.patch.swin``): its fused path adds
the window mask to the bias at full (batch x windows) size.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vkernels.ops.attention import attention
from vkernels.patch.common import wrap_forward, wrapped_forward
from vkernels.patch.report import Left


def sdpa_through_vkernels(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, *, backend=None):
    """``F.scaled_dot_product_attention``'s arguments, run by ``vkernels.attention`` when the kernels
    have what the call needs, else by stock SDPA."""
    if dropout_p > 0 or enable_gqa:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return attention(query, key, value, attn_mask, is_causal=is_causal, scale=scale, backend=backend)


class SdpaToVkernels(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` runs ``sdpa_through_vkernels`` on ``backend``."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa_through_vkernels(*args, **kwargs, backend=self.backend)
        return func(*args, **kwargs)


def sdpa_routed_forward(module, backend, *args, **kwargs):
    """The module's own forward, its SDPA calls routed to vkernels."""
    with SdpaToVkernels(backend):
        return type(module).forward(module, *args, **kwargs)


def route_timm_attention(module, backend):
    if not type(module).__module__.startswith("timm.") or not hasattr(module, "fused_attn"):
        return None
    if wrapped_forward(module) is not None:
        return None  # patched before
    if not module.fused_attn:
        return Left("timm's fused_attn is off here (TIMM_FUSED_ATTN=0, or an experimental fused path): "
                    "its attention is explicit matmuls")
    wrap_forward(module, sdpa_routed_forward, backend)
    return module, f"timm {type(module).__name__}: F.scaled_dot_product_attention -> vkernels.attention"
