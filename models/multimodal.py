"""Image-text models on vkernels attention: a CLIP-style dual encoder and a cross-attention fusion
classifier, plus a word-level tokenizer for digit prompts.

Both image towers are :class:`~vkernels.models.vit.VisionTransformer` (timm names); the text tower
is a causal pre-norm transformer with open_clip's layout (token + position embeddings, causal
blocks, ``ln_final``, pooling at the end-of-text token). Every attention goes through
``vkernels.attention`` with the model's ``backend``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import vkernels

from .vit import Block, Mlp, VisionTransformer, _init_linear

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitTokenizer:
    """A fixed word-level tokenizer for short English prompts about digits.

    Vocabulary: ``<pad>`` = 0, ``<sot>`` = 1, ``<unk>`` = 2, then a few prompt words, the digit names
    "zero".."nine" and "0".."9", and ``<eot>`` as the **largest** id, so pooling the text at
    ``argmax(token id)`` finds the end of the text as in CLIP. Text is lower-cased and split on
    anything that is not a letter or digit; unknown words map to ``<unk>``. Each text becomes
    ``[<sot>, words..., <eot>]`` padded with ``<pad>`` to ``context_length`` (truncated texts keep
    their ``<eot>``).
    """

    WORDS = ("a", "an", "the", "photo", "picture", "image", "drawing", "of", "digit", "number",
             "handwritten", "this", "is", "what", "which", "blurry", "small", "large", *DIGIT_NAMES,
             *(str(i) for i in range(10)))

    def __init__(self, context_length: int = 12) -> None:
        if context_length < 2:
            raise ValueError("DigitTokenizer: context_length must leave room for <sot> and <eot>")
        self.context_length = context_length
        self.vocab = {"<pad>": 0, "<sot>": 1, "<unk>": 2}
        for word in self.WORDS:
            self.vocab[word] = len(self.vocab)
        self.vocab["<eot>"] = len(self.vocab)
        self.pad_id, self.sot_id, self.unk_id, self.eot_id = 0, 1, 2, self.vocab["<eot>"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        ids = [self.vocab.get(word, self.unk_id) for word in words][: self.context_length - 2]
        return [self.sot_id, *ids, self.eot_id]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, context_length) int64 token ids (one row for a single string)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


def digit_prompts(template: str = "a photo of the digit {}") -> list[str]:
    """One prompt per class 0..9, e.g. "a photo of the digit seven"."""
    return [template.format(name) for name in DIGIT_NAMES]


class TextTransformer(nn.Module):
    """Causal text encoder: token + learned position embeddings, pre-norm blocks with causal
    ``vkernels.attention``, ``ln_final``; pooled at the end-of-text token (``pool="argmax"``: the
    position of the largest token id, as CLIP's tokenizers give EOT the largest id) or at the last
    position (``pool="last"``, for unpadded text)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 12,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        pool: str = "argmax",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("argmax", "last"):
            raise ValueError(f"TextTransformer: pool must be 'argmax' or 'last', got {pool!r}")
        self.backend = backend
        self.pool_type = pool
        self.context_length = context_length
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, eps=1e-5) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks.apply(_init_linear)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, width) after ``ln_final``; position i sees tokens 0..i."""
        if tokens.shape[-1] > self.context_length:
            raise ValueError(f"TextTransformer: {tokens.shape[-1]} tokens, context_length is {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x, is_causal=True, backend=self.backend)
        return self.ln_final(x)

    def pool(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "last":
            return features[:, -1]
        return features[torch.arange(features.shape[0], device=features.device), tokens.argmax(dim=-1)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(tokens), tokens)

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i matches text i, over images and over texts."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2


class _SyncedBackend:
    """``model.backend = ...`` also sets the backend of the towers, so every vkernels call follows it."""

    _towers: tuple[str, ...] = ()

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = value
        for name in self._towers:
            getattr(self, name).backend = value

    def extra_repr(self) -> str:
        return "" if self._backend is None else f"backend={self._backend!r}"


class CLIP(_SyncedBackend, nn.Module):
    """CLIP-style dual encoder: a ViT image tower (class-token features), a causal text tower,
    bias-free linear projections into a shared ``embed_dim`` space, and a learned temperature
    ``logit_scale`` (log of the inverse temperature, initialised to log(1/0.07), clamped at 100
    when used). vkernels: every attention of both towers (``is_causal`` in the text tower); the
    rest is stock.
    """

    _towers = ("visual", "text")

    def __init__(
        self,
        embed_dim: int = 512,
        image_size=224,
        patch_size=16,
        in_channels: int = 3,
        vision_width: int = 768,
        vision_depth: int = 12,
        vision_heads: int = 12,
        vocab_size: int = 49408,
        context_length: int = 77,
        text_width: int = 512,
        text_depth: int = 12,
        text_heads: int = 8,
        text_pool: str = "argmax",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.visual = VisionTransformer(
            image_size, patch_size, in_channels, num_classes=0, embed_dim=vision_width, depth=vision_depth,
            num_heads=vision_heads,
        )
        self.text = TextTransformer(vocab_size, context_length, text_width, text_depth, text_heads, pool=text_pool)
        self.visual_projection = nn.Linear(vision_width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.visual_projection.weight, std=vision_width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text_width**-0.5)
        self.backend = backend

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual_projection(self.visual(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_projection(self.text(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (B_img, B_txt), logits_per_text): scaled cosine similarities."""
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(tokens, normalize=True)
        logits_per_image = self.scale() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def contrastive_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Symmetric cross-entropy over a batch of matching (image i, text i) pairs."""
        return contrastive_loss(self(images, tokens)[0])

    def zero_shot_classifier(self, texts, tokenizer: DigitTokenizer | None = None) -> torch.Tensor:
        """(C, embed_dim) unit class embeddings from prompts: token ids (C, L), or (C, T, L) for T
        templates per class (embeddings averaged, as in CLIP's prompt ensembling), or a list of C
        strings tokenized by ``tokenizer`` (default: ``DigitTokenizer`` at this context length)."""
        if not isinstance(texts, torch.Tensor):
            tokenizer = tokenizer or DigitTokenizer(self.text.context_length)
            texts = tokenizer(list(texts))
        tokens = texts.to(self.logit_scale.device)
        classes = tokens.shape[0]
        features = self.encode_text(tokens.reshape(-1, tokens.shape[-1]), normalize=True)
        features = features.view(classes, -1, features.shape[-1]).mean(dim=1)
        return F.normalize(features, dim=-1)

    def zero_shot_logits(self, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """(B, C) class logits for images against ``zero_shot_classifier``'s output; argmax predicts."""
        return self.scale() * self.encode_image(images, normalize=True) @ classifier.t()


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another (``q``, ``kv``, ``proj``); k and v are
    strided views of the one kv projection's output. Query and key lengths differ freely."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).view(batch, length, heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = vkernels.attention(q, k, v, backend=backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: ``x + attn(norm_q(x), norm_kv(context))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context), backend=backend)
        return x + self.mlp(self.norm2(x))


class FusionClassifier(_SyncedBackend, nn.Module):
    """Image-text fusion: the text (a prompt or question, causal text tower) attends to the image's
    patch tokens (ViT, projected to the text width) through ``fusion_depth`` cross-attention blocks;
    the fused end-of-text token (argmax token id) goes through ``norm`` and ``head``. vkernels: the
    ViT's and text tower's self-attention and the cross-attention (Lq = text length, Lk = patches).
    """

    _towers = ("visual", "text")

    def __init__(
        self,
        num_classes: int = 10,
        image_size=224,
        patch_size=16,
        in_channels: int = 3,
        vision_width: int = 384,
        vision_depth: int = 6,
        vision_heads: int = 6,
        vocab_size: int = DigitTokenizer().vocab_size,
        context_length: int = 12,
        text_width: int = 256,
        text_depth: int = 2,
        text_heads: int = 4,
        fusion_depth: int = 2,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.visual = VisionTransformer(
            image_size, patch_size, in_channels, num_classes=0, embed_dim=vision_width, depth=vision_depth,
            num_heads=vision_heads,
        )
        self.text = TextTransformer(vocab_size, context_length, text_width, text_depth, text_heads)
        self.image_projection = nn.Linear(vision_width, text_width)
        self.cross_blocks = nn.ModuleList(CrossBlock(text_width, text_heads) for _ in range(fusion_depth))
        self.norm = nn.LayerNorm(text_width)
        self.head = nn.Linear(text_width, num_classes)
        self.image_projection.apply(_init_linear)
        self.cross_blocks.apply(_init_linear)
        self.head.apply(_init_linear)
        self.backend = backend

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits for images (B, C, H, W) and token ids (B, L) (or (1, L): one
        prompt for every image)."""
        patches = self.image_projection(self.visual.forward_features(images)[:, 1:])
        tokens = tokens.expand(images.shape[0], -1)
        x = self.text.forward_features(tokens)
        for block in self.cross_blocks:
            x = block(x, patches, backend=self._backend)
        x = self.text.pool(self.norm(x), tokens)
        return self.head(x)
