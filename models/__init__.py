"""Models built on vkernels ops.

Each model takes ``backend=`` (stored; every vkernels call it makes uses it) and keeps stock
parameter names: torchvision's for ``ResNet``, timm's for ``VisionTransformer``.
"""
from .cnn import ResNet, SeedCNN, resnet18, resnet34
from .multimodal import CLIP, DigitTokenizer, FusionClassifier, TextTransformer, contrastive_loss, digit_prompts
from .vit import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = [
    "CLIP",
    "DigitTokenizer",
    "FusionClassifier",
    "ResNet",
    "SeedCNN",
    "TextTransformer",
    "VisionTransformer",
    "contrastive_loss",
    "digit_prompts",
    "resnet18",
    "resnet34",
    "vit_base",
    "vit_small",
    "vit_tiny",
]
