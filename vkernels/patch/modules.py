"""Rules that swap a stock module for its vkernels twin of the same configuration: pooling and
``nn.MultiheadAttention``."""
from __future__ import annotations

import torch

from vkernels.nn.attention import MultiheadAttention
from vkernels.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from vkernels.patch.common import share_state


def _max_pool(m, backend):
    return share_state(MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode, backend=backend), m)


def _avg_pool(m, backend):
    return share_state(
        AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override, backend=backend), m
    )


def _adaptive_avg_pool(m, backend):
    return share_state(AdaptiveAvgPool2d(m.output_size, backend=backend), m)


_POOLING = {
    torch.nn.MaxPool2d: _max_pool,
    torch.nn.AvgPool2d: _avg_pool,
    torch.nn.AdaptiveAvgPool2d: _adaptive_avg_pool,
}


def replace_pooling(module, backend):
    build = _POOLING.get(type(module))
    if build is None:
        return None
    new = build(module, backend)
    return new, f"{type(module).__name__} -> vkernels.nn.{type(new).__name__}"


def replace_multihead_attention(m, backend):
    if type(m) is not torch.nn.MultiheadAttention:
        return None
    # Built on the meta device (no allocation), then given the original parameters and out_proj.
    new = MultiheadAttention(
        m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
        add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
        batch_first=m.batch_first, device="meta", backend=backend,
    )
    return share_state(new, m), "MultiheadAttention -> vkernels.nn.MultiheadAttention"
