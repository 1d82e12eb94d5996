"""Rotary position embeddings (RoPE): the cos/sin tables and the rotation itself.

``vkernels.attention`` and ``vkernels.varlen_attention`` take ``rotary=(cos, sin)`` and rotate q and
k inside their kernels; :func:`rotary_tables` builds those tables for 1-D or 2-D (row, column)
positions the way Qwen2-VL's vision tower and timm's EVA-02 / DINOv3 ViTs build theirs, and
:func:`apply_rotary` is the rotation in PyTorch (what the models do before attention, and what the
``torch`` backend runs).

Convention (Hugging Face's and timm's): tables of ``rotary_dim`` columns, one row per token; the
first ``rotary_dim`` columns of x become ``x * cos + rotate(x) * sin`` and the rest stay as they are,
``rotate`` being ``(-x2, x1)`` for the halves x1, x2 of those columns (``interleaved=False``: the
GPT-NeoX / Llama "rotate_half" layout) or ``(-x1, x0, -x3, x2, ...)`` (``interleaved=True``: the
GPT-J / Meta layout of neighbouring pairs).
"""
from __future__ import annotations

import torch


def rotary_tables(positions: torch.Tensor, dim: int, theta: float = 10000.0, *,
                  interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (tokens, dim) float32, for ``positions`` of shape (tokens,) or (tokens, axes).

    Each of the A axes gets dim / A of the columns, with frequencies ``theta ** (-2j / (dim / A))``
    for j < dim / (2A); the angle of axis a and frequency j is ``positions[:, a] * frequency_j``.
    ``interleaved=False`` lays the angles out as (all axes' angles, then the same again), as
    Qwen2-VL and timm's ``rotate_half`` models do; ``interleaved=True`` repeats each angle twice in a
    row, as timm's interleaved models (EVA-02) do.

    Qwen2-VL's vision tower: positions = (row, column) of each patch (integers), theta = 10000.
    timm EVA-02: the patch grid's (row, column) indices scaled to the pretraining grid, interleaved.
    timm DINOv3: 2π times the patch centres' coordinates in [-1, 1], theta = the model's temperature.
    1-D RoPE (text): positions = token index.
    """
    positions = torch.as_tensor(positions)
    if positions.dim() == 1:
        positions = positions[:, None]
    if positions.dim() != 2:
        raise ValueError(f"rotary_tables: positions must be (tokens,) or (tokens, axes), got shape {tuple(positions.shape)}")
    axes = positions.shape[1]
    if axes == 0 or dim <= 0 or dim % (2 * axes):
        raise ValueError(f"rotary_tables: dim must be a positive multiple of 2 x axes = {2 * axes}, got {dim}")
    per_axis = dim // axes
    exponents = torch.arange(0, per_axis, 2, dtype=torch.float32, device=positions.device) / per_axis
    frequencies = theta ** -exponents  # (per_axis / 2,)
    angles = (positions.to(torch.float32)[:, :, None] * frequencies).flatten(1)  # (tokens, dim / 2)
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``rotate(x)`` of the convention above, over x's last dim."""
    if interleaved:
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
    first, second = x.chunk(2, -1)
    return torch.cat([-second, first], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x with its first cos.shape[-1] columns rotated, in float32 (at least), returned in x's dtype as
    the models round it; cos and sin broadcast against those columns of x."""
    rotary_dim = cos.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    rotated = x[..., :rotary_dim].to(compute)
    rotated = rotated * cos.to(compute) + rotate(rotated, interleaved) * sin.to(compute)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], -1)
