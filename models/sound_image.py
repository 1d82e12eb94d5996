"""Sound-image fusion on vkernels: a spectrogram CNN and an image tower, fused by cross-attention.

Each tower is a classifier of its own (:class:`~vkernels.models.audio.SpectrogramCNN`, and
:class:`~vkernels.models.cnn.SeedCNN` or :class:`~vkernels.models.vit.VisionTransformer`); the
fusion reads their token features, so one forward gives the fused prediction and each tower's own.
"""
from __future__ import annotations

import torch
from torch import nn

from .audio import SpectrogramCNN
from .cnn import SeedCNN
from .multimodal import CrossBlock, _SyncedBackend
from .vit import VisionTransformer, _init_linear


def _as_tokens(features: torch.Tensor) -> torch.Tensor:
    """A CNN's (B, C, H, W) map as (B, H·W, C) tokens; a transformer's (B, L, C) tokens as they are."""
    return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features


class SoundImageFusion(_SyncedBackend, nn.Module):
    """Classifies a (sound, image) pair: ``num_queries`` learned fusion tokens attend to the audio
    tower's tokens and the image tower's tokens together, through ``depth`` pre-norm cross-attention
    blocks (``vkernels.attention``, Lq = num_queries, Lk = audio + image tokens); their mean goes
    through ``norm`` and ``head``.

    Each modality's tokens are projected to ``dim`` and tagged with a learned modality embedding.
    Attending over both modalities at once lets the fusion tokens weigh them per sample, so a pair
    whose image (or sound) is drowned in noise can still be read from the other modality.

    ``audio`` and ``visual`` default to ``SpectrogramCNN(num_classes)`` and ``SeedCNN(num_classes)``
    (32×32 RGB); pass towers built elsewhere (a ``VisionTransformer`` works as the image tower) to
    change their sizes. vkernels: the towers' ops (fused conv+ReLU+pool, conv+ReLU, pooling or
    attention) and the fusion's cross-attention, all with the model's ``backend``.
    """

    _towers = ("audio", "visual")

    def __init__(
        self,
        num_classes: int = 10,
        audio: SpectrogramCNN | None = None,
        visual: SeedCNN | VisionTransformer | None = None,
        dim: int = 64,
        num_heads: int = 4,
        depth: int = 2,
        num_queries: int = 1,
        mlp_ratio: float = 2.0,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.audio = SpectrogramCNN(num_classes) if audio is None else audio
        self.visual = SeedCNN(num_classes) if visual is None else visual
        self.audio_projection = nn.Linear(self.audio.num_features, dim)
        self.image_projection = nn.Linear(self.visual.num_features, dim)
        self.modality_embedding = nn.Parameter(torch.randn(2, dim) * 0.02)  # row 0: sound, row 1: image
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(CrossBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for module in (self.audio_projection, self.image_projection, self.blocks, self.head):
            module.apply(_init_linear)
        self.backend = backend

    def fuse(self, audio_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Fused logits from the towers' tokens, (B, La, audio features) and (B, Li, image features)."""
        context = torch.cat([self.audio_projection(audio_tokens) + self.modality_embedding[0],
                             self.image_projection(image_tokens) + self.modality_embedding[1]], dim=1)
        x = self.queries.expand(context.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, context, backend=self._backend)
        return self.head(self.norm(x).mean(dim=1))

    def logits_per_modality(self, waveform: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"fused", "audio", "image"}: (B, num_classes) logits of the fusion and of each tower alone
        (its own head on its own features), from one pass through each tower."""
        audio_tokens = self.audio.forward_features(waveform)
        image_features = self.visual.forward_features(images)
        return {
            "fused": self.fuse(audio_tokens, _as_tokens(image_features)),
            "audio": self.audio.forward_head(audio_tokens),
            "image": self.visual.forward_head(image_features),
        }

    def forward(self, waveform: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) fused logits for waveforms (B, samples) and images (B, C, H, W)."""
        return self.fuse(self.audio.forward_features(waveform), _as_tokens(self.visual.forward_features(images)))
