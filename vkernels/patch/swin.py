"""Swin's shifted-window attention with windows as batch entries (torchvision ``swin_*``, ``swin_v2_*``;
timm ``swin*``, ``swinv2*``).

The windows of B images are attended as (B, nW, H) batches of ``vkernels.attention``: q, k, v are
strided views of the qkv projection, the shift mask (nW, N, N) is read per window and the relative
position bias (H, N, N) per head, both in the kernels' one pass and never expanded to (B x nW)
copies; the bias (a learned table, or v2's MLP of coordinates) gets its gradient, summed over images
and windows, from the kernels. v2's cosine attention multiplies the normalised queries by its learned
per-head logit scale and passes ``scale=1``. The output is laid out (B, nW, N, H, E), so the
(B * nW, N, C) input of the projection is a view.

What still copies, as in the stock models: the padding to whole windows (only when the feature map
is not a multiple of the window), the cyclic shift (``torch.roll``) and its reverse, the window
partition and its reverse (permute + reshape), and v2's normalised q and k.

The module keeps its class, parameters and buffers; its forward is replaced on the instance. In
training with attention dropout the stock forward runs (the kernels have no dropout).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vkernels.ops.attention import attention
from vkernels.patch.common import loaded_class, wrap_forward, wrapped_forward


def window_attention(qkv, num_windows, num_heads, bias, shift_mask=None, *, scale=None, logit_scale=None,
                     backend=None):
    """Self-attention within windows: ``qkv`` (B * nW, N, 3 * C) is the fused projection of nW windows
    of N tokens for each of B images, ``bias`` the (1, H, N, N) or (H, N, N) additive bias,
    ``shift_mask`` None or (nW, N, N) additive. ``logit_scale`` (H, 1, 1): cosine attention with that
    per-head scale. Returns (B * nW, N, C), a view of the kernel's output."""
    windows, length, _ = qkv.shape
    q, k, v = qkv.view(windows // num_windows, num_windows, length, 3, num_heads, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)
    if logit_scale is not None:
        q, k, scale = F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), 1.0
    mask = None if shift_mask is None else shift_mask.view(num_windows, 1, length, length)
    out = attention(q, k, v, mask, scale=scale, attn_bias=bias, backend=backend)  # (B, nW, H, N, E)
    return out.transpose(-3, -2).reshape(windows, length, -1)


def shift_mask(padded_size, window_size, shift_size, device, dtype) -> torch.Tensor:
    """torchvision's mask of shifted windows, (nW, N, N): 0 within a region, -100 across regions."""
    pad_h, pad_w = padded_size
    regions = torch.zeros((pad_h, pad_w), device=device, dtype=dtype)
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
    for count, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        regions[h[0]:h[1], w[0]:w[1]] = count
    regions = regions.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window_size[0] * window_size[1])
    differs = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differs.masked_fill(differs != 0, -100.0).masked_fill(differs == 0, 0.0)


def torchvision_window_forward(module, backend, x):
    """torchvision's ``shifted_window_attention`` (v1, and v2 when the module has a logit scale)
    with windows as batch entries."""
    if module.training and module.attention_dropout > 0:
        return type(module).forward(module, x)
    logit_scale = getattr(module, "logit_scale", None)
    window_size, num_heads = module.window_size, module.num_heads
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    # no shift where the window covers the whole feature map
    shift_size = [0 if window_size[i] >= (pad_H, pad_W)[i] else module.shift_size[i] for i in range(2)]
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    rows, cols = pad_H // window_size[0], pad_W // window_size[1]
    x = x.view(B, rows, window_size[0], cols, window_size[1], C).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(B * rows * cols, window_size[0] * window_size[1], C)

    qkv_bias = module.qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # v2 has no key bias
        qkv_bias = torch.cat((qkv_bias[: C], torch.zeros_like(qkv_bias[C: 2 * C]), qkv_bias[2 * C:]))
    qkv = F.linear(x, module.qkv.weight, qkv_bias)
    mask = None
    if sum(shift_size) > 0:
        mask = shift_mask((pad_H, pad_W), window_size, shift_size, x.device, x.dtype)
    if logit_scale is not None:
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
    x = window_attention(qkv, rows * cols, num_heads, module.get_relative_position_bias(), mask,
                         scale=(C // num_heads) ** -0.5, logit_scale=logit_scale, backend=backend)
    x = F.dropout(F.linear(x, module.proj.weight, module.proj.bias), p=module.dropout, training=module.training)

    x = x.view(B, rows, cols, window_size[0], window_size[1], C).permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def timm_window_forward(module, backend, x, mask=None):
    """timm's Swin ``WindowAttention.forward``: x (B * nW, N, C), mask None or (nW, N, N)."""
    if module.training and module.attn_drop.p > 0:
        return type(module).forward(module, x, mask)
    num_windows = 1 if mask is None else mask.shape[0]
    x = window_attention(module.qkv(x), num_windows, module.num_heads, module._get_rel_pos_bias(), mask,
                         scale=module.scale, backend=backend)
    return module.proj_drop(module.proj(x))


def timm_window_v2_forward(module, backend, x, mask=None):
    """timm's Swin v2 ``WindowAttention.forward``: cosine attention, a bias from an MLP of coordinates."""
    if module.training and module.attn_drop.p > 0:
        return type(module).forward(module, x, mask)
    qkv = module.qkv(x)
    if module.q_bias is not None:
        qkv_bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
        qkv = qkv + qkv_bias if module.qkv_bias_separate else F.linear(x, module.qkv.weight, qkv_bias)
    logit_scale = torch.clamp(module.logit_scale, max=math.log(1.0 / 0.01)).exp()
    length = x.shape[1]
    table = module.cpb_mlp(module.relative_coords_table).view(-1, module.num_heads)
    bias = table[module.relative_position_index.view(-1)].view(length, length, -1).permute(2, 0, 1)
    num_windows = 1 if mask is None else mask.shape[0]
    x = window_attention(qkv, num_windows, module.num_heads, 16 * torch.sigmoid(bias), mask,
                         logit_scale=logit_scale, backend=backend)
    return module.proj_drop(module.proj(x))


_WINDOW_FORWARDS = (
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention", torchvision_window_forward),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2", torchvision_window_forward),
    ("timm.models.swin_transformer", "WindowAttention", timm_window_forward),
    ("timm.models.swin_transformer_v2", "WindowAttention", timm_window_v2_forward),
)


def window_attention_rule(module, backend):
    for library, name, forward in _WINDOW_FORWARDS:
        if type(module) is loaded_class(library, name):
            if wrapped_forward(module) is not None:
                return None  # patched before
            wrap_forward(module, forward, backend)
            return module, f"{library.split('.')[0]} {name}: windows as batch entries -> vkernels.attention"
    return None
