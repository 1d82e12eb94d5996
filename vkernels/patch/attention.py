"""timm's ViT attention: the attention core of ``timm.layers.attention.Attention`` through
``vkernels.attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vkernels.ops.attention import attention
from vkernels.patch.common import loaded_class, share_state
from vkernels.patch.report import Left


def _timm_attention_classes():
    """timm's ViT attention class: ``timm.layers.attention.Attention`` in timm >= 1.0, defined in
    ``timm.models.vision_transformer`` before that."""
    found = (loaded_class(name, "Attention") for name in ("timm.layers.attention", "timm.models.vision_transformer"))
    return {cls for cls in found if cls is not None}


def replace_timm_attention(module, backend):
    kind = type(module)
    if kind not in _timm_attention_classes():
        return None
    if not TimmAttention.supports(module):
        return Left(f"children {sorted(module._modules)} or qkv layer not as in timm's ViT Attention")
    return TimmAttention(module, backend=backend), f"timm {kind.__name__} -> vkernels.patch.TimmAttention"



class TimmAttention(torch.nn.Module):
    """timm's ViT ``Attention`` with the same submodules (``qkv``, ``q_norm``, ``k_norm``,
    ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``; so the same state_dict keys) whose
    attention core is ``vkernels.attention`` on strided (no-copy) views of the qkv output.

    Attention dropout in training (``attn_drop.p > 0``) has no kernel: those calls run SDPA.
    """

    _KNOWN_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}

    @classmethod
    def supports(cls, module) -> bool:
        required = all(hasattr(module, name) for name in ("qkv", "proj", "num_heads", "fused_attn"))
        return required and set(module._modules) <= cls._KNOWN_CHILDREN and isinstance(module.qkv, torch.nn.Linear)

    def __init__(self, module: torch.nn.Module, *, backend: str | None = None) -> None:
        super().__init__()
        share_state(self, module)
        self.num_heads = module.num_heads
        self.attn_dim = getattr(module, "attn_dim", module.qkv.out_features // 3)
        self.head_dim = getattr(module, "head_dim", self.attn_dim // self.num_heads)
        self.scale = getattr(module, "scale", self.head_dim**-0.5)
        self.fused_attn = module.fused_attn
        if "gate" not in self._modules:
            self.gate = None
        self.backend = backend

    def extra_repr(self) -> str:
        config = f"num_heads={self.num_heads}, head_dim={self.head_dim}"
        return config if self.backend is None else f"{config}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3, H, D) -> three (B, H, N, D) views of the one projection output
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if dropout_p > 0:  # the kernels have no dropout
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale)
        else:
            out = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        if "norm" in self._modules:  # timm's scale_norm (Identity unless enabled; absent in older timm)
            out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    @staticmethod
    def _norm(norm, x):
        return x if isinstance(norm, torch.nn.Identity) else norm(x)

