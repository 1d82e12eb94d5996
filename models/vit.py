"""Vision Transformer on vkernels attention, with timm's parameter names.

``VisionTransformer`` matches timm's ``VisionTransformer`` (class token, learned position embedding,
pre-norm blocks, LayerNorm eps 1e-6, exact GELU, class-token pooling) key for key, so a timm
state_dict such as ``vit_tiny_patch16_224``'s loads with ``load_state_dict``. Dropout, drop-path
and layer scale are left out (the attention kernels have no dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vkernels


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Attention(nn.Module):
    """Multi-head self-attention (timm's ``attn.qkv``/``attn.proj``); q, k and v are strided views of
    the one qkv projection's output, read in place by ``vkernels.attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, is_causal: bool = False, backend: str | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        # (B, L, 3, H, D) -> three (B, H, L, D) views: no copy.
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = vkernels.attention(q, k, v, is_causal=is_causal, backend=backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, is_causal: bool = False, backend: str | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), is_causal=is_causal, backend=backend)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches as a conv with kernel = stride = patch size (timm's ``patch_embed.proj``)."""

    def __init__(self, image_size, patch_size, in_channels: int, dim: int) -> None:
        super().__init__()
        self.image_size, self.patch_size = _pair(image_size), _pair(patch_size)
        if any(i % p for i, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"PatchEmbed: image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        self.grid_size = tuple(i // p for i, p in zip(self.image_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, dim, self.patch_size, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"PatchEmbed: input of size {tuple(x.shape[-2:])}, model built for {self.image_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim); no ReLU, so a stock conv


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, class token, position embedding, ``depth`` pre-norm blocks,
    final LayerNorm, then the class token (``global_pool="token"``) or the patch-token mean
    (``"avg"``) through ``head`` (``nn.Identity`` when ``num_classes=0``).

    vkernels: every block's attention is ``vkernels.attention`` with the model's ``backend``;
    LayerNorm, GELU, linear layers and the patch-embedding conv (no ReLU) are stock.
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        in_channels: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        global_pool: str = "token",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"VisionTransformer: global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.backend = backend
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, embed_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + num_patches, embed_dim), class token first."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, backend=self.backend)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.global_pool == "token" else tokens[:, 1:].mean(dim=1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def vit_tiny(image_size=224, patch_size=16, **kwargs) -> VisionTransformer:
    """ViT-Ti: width 192, 12 blocks, 3 heads (timm ``vit_tiny_patch16_224`` at the defaults)."""
    return VisionTransformer(image_size, patch_size, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_small(image_size=224, patch_size=16, **kwargs) -> VisionTransformer:
    """ViT-S: width 384, 12 blocks, 6 heads."""
    return VisionTransformer(image_size, patch_size, embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(image_size=224, patch_size=16, **kwargs) -> VisionTransformer:
    """ViT-B: width 768, 12 blocks, 12 heads."""
    return VisionTransformer(image_size, patch_size, embed_dim=768, depth=12, num_heads=12, **kwargs)
