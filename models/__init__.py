"""Models built on vkernels ops.

Each model takes ``backend=`` (stored; every vkernels call it makes uses it) and keeps stock
parameter names: torchvision's for ``ResNet``, timm's for ``VisionTransformer``.
"""
from .audio import LogMelSpectrogram, SpectrogramCNN
from .cnn import ResNet, SeedCNN, resnet18, resnet34
from .detection import Detector, detect, mean_average_precision
from .multimodal import CLIP, DigitTokenizer, FusionClassifier, TextTransformer, contrastive_loss, digit_prompts
from .sound_image import SoundImageFusion
from .vit import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = [
    "CLIP",
    "Detector",
    "DigitTokenizer",
    "FusionClassifier",
    "LogMelSpectrogram",
    "ResNet",
    "SeedCNN",
    "SoundImageFusion",
    "SpectrogramCNN",
    "TextTransformer",
    "VisionTransformer",
    "contrastive_loss",
    "detect",
    "digit_prompts",
    "mean_average_precision",
    "resnet18",
    "resnet34",
    "vit_base",
    "vit_small",
    "vit_tiny",
]
