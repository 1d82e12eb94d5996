"""CNNs on vkernels ops: the seeds' small classifier and a torchvision-style ResNet.

Parameters are plain ``torch.nn`` layers with stock names (``ResNet`` uses torchvision's: ``conv1``,
``bn1``, ``layer1.0.conv1``, ..., ``fc``), so state_dicts move between these models and stock ones;
``forward`` routes the computation through ``vkernels`` with the model's ``backend``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import vkernels
from vkernels.nn.conv import fold_batch_norm


def _conv_output(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class SeedCNN(nn.Module):
    """The seeds' classifier: three unpadded 3×3 conv+ReLU (two followed by a 2×2 max-pool), then
    flatten → linear → ReLU → linear.

    For 32×32 input the spatial size goes 32 → 30 → 15 → 13 → 6 → 4, so ``fc1`` takes 64·4·4
    features. ``channels``/``hidden``/``image_size`` shrink it for tests (``image_size`` ≥ 18).
    vkernels: every conv+bias+ReLU is one ``conv2d_relu``, each pool is ``max_pool2d``; the linear
    layers are stock (vkernels has no linear op).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 64),
        hidden: int = 64,
        image_size: int = 32,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.conv3 = nn.Conv2d(c2, c3, 3)
        self.num_features = c3  # channels of forward_features' map
        size = _conv_output(_conv_output(_conv_output(_conv_output(_conv_output(image_size, 3), 2, 2), 3), 2, 2), 3)
        if size < 1:
            raise ValueError(f"SeedCNN: image_size={image_size} leaves no pixels after the last conv (needs >= 18)")
        self.fc1 = nn.Linear(c3 * size * size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv's feature map, (B, channels[2], 4, 4) for 32×32 input."""
        b = self.backend
        x = vkernels.max_pool2d(vkernels.conv2d_relu(x, self.conv1.weight, self.conv1.bias, backend=b), 2, backend=b)
        x = vkernels.max_pool2d(vkernels.conv2d_relu(x, self.conv2.weight, self.conv2.bias, backend=b), 2, backend=b)
        return vkernels.conv2d_relu(x, self.conv3.weight, self.conv3.bias, backend=b)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(features.flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv3×3 → BN → ReLU → conv3×3 → BN → (+ shortcut) → ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        if self.training:
            # Batch statistics sit between conv and ReLU: no fused kernel is exact here.
            identity = x if self.downsample is None else self.downsample(x)
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + identity)
        # Eval: BN folded into each conv; the final conv → BN → add → ReLU is one conv2d_relu.
        if self.downsample is None:
            identity = x
        else:
            weight, bias = fold_batch_norm(self.downsample[0].weight, self.downsample[0].bias, self.downsample[1])
            identity = F.conv2d(x, weight, bias, self.downsample[0].stride)  # no ReLU: stock conv
        weight, bias = fold_batch_norm(self.conv1.weight, self.conv1.bias, self.bn1)
        out = vkernels.conv2d_relu(x, weight, bias, self.stride, 1, backend=backend)
        weight, bias = fold_batch_norm(self.conv2.weight, self.conv2.bias, self.bn2)
        return vkernels.conv2d_relu(out, weight, bias, 1, 1, residual=identity, backend=backend)


class ResNet(nn.Module):
    """ResNet with basic blocks and torchvision's parameter names; ``ResNet((2, 2, 2, 2))`` has
    exactly ``torchvision.models.resnet18``'s state_dict keys and shapes.

    ``layers`` gives the blocks per stage, ``width`` the first stage's channels (doubled each
    stage). The routing depends on the mode, so that both are exact:

    - eval: BN is folded into the conv weights (differentiably, every forward); stem conv → BN → ReLU
      and each block's first conv → BN → ReLU are one ``vkernels.conv2d_relu``, and the block's final
      conv → BN → add shortcut → ReLU is ``conv2d_relu(..., residual=shortcut)``. The 1×1 downsample
      conv has no ReLU and stays stock.
    - train: BN normalizes by batch statistics (and updates running ones) between conv and ReLU, so
      conv → BN → (add) → ReLU stays stock PyTorch.
    - both: the stem max-pool is ``vkernels.max_pool2d`` and the head's global pool
      ``vkernels.adaptive_avg_pool2d``; ``fc`` is a stock linear layer.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        for stage, blocks in enumerate(layers):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            modules = []
            for index in range(blocks):
                modules.append(BasicBlock(self.inplanes, planes, stride if index == 0 else 1))
                self.inplanes = planes
            self.add_module(f"layer{stage + 1}", nn.Sequential(*modules))
        self.num_stages = len(layers)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backend
        if self.training:
            x = F.relu(self.bn1(self.conv1(x)))
        else:
            weight, bias = fold_batch_norm(self.conv1.weight, self.conv1.bias, self.bn1)
            x = vkernels.conv2d_relu(x, weight, bias, 2, 3, backend=b)
        x = vkernels.max_pool2d(x, 3, 2, 1, backend=b)
        for stage in range(self.num_stages):
            for block in getattr(self, f"layer{stage + 1}"):
                x = block(x, backend=b)
        return vkernels.adaptive_avg_pool2d(x, 1, backend=b).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes=num_classes, **kwargs)
