"""torchvision's ResNets: in eval mode, conv -> BN -> ReLU as one ``conv2d_relu`` with the BN folded,
the block's last conv -> BN -> add -> ReLU through the residual epilogue, and the stem likewise."""
from __future__ import annotations

import torch

from vkernels.nn.conv import fold_batch_norm
from vkernels.ops.conv import conv2d_relu
from vkernels.patch.common import loaded_class, share_state
from vkernels.patch.report import Left


def _torchvision_class(name):
    return loaded_class("torchvision.models.resnet", name)


def replace_resnet_block(module, backend):
    kind = type(module)
    if kind not in (_torchvision_class("BasicBlock"), _torchvision_class("Bottleneck")):
        return None
    if not ResNetBlock.supports(module):
        return Left("its BatchNorms are in training mode (batch statistics do not fold) or its layers are not stock")
    new = ResNetBlock(module, backend=backend)
    return new, f"torchvision {kind.__name__} -> vkernels.patch.ResNetBlock ({new.extra_repr()})"



def _foldable(conv, bn) -> bool:
    return (
        type(conv) is torch.nn.Conv2d and conv.padding_mode == "zeros"
        and isinstance(bn, torch.nn.BatchNorm2d) and not bn.training
        and bn.running_mean is not None and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


class _FoldCache:
    """Folded weights of one conv + BN pair, recomputed when any of their tensors changes (in-place
    updates bump ``_version``; ``.to()`` moves data). With gradients needed it folds every call."""

    def __init__(self) -> None:
        self.key, self.value = None, None

    def __call__(self, conv, bn):
        tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return fold_batch_norm(conv.weight, conv.bias, bn)
        key = (bn.eps, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        if key != self.key:
            with torch.no_grad():
                self.value = fold_batch_norm(conv.weight, conv.bias, bn)
            self.key = key
        return self.value


def _conv_bn_relu(conv, bn, cache, x, residual=None, backend=None):
    weight, bias = cache(conv, bn)
    return conv2d_relu(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, residual=residual, backend=backend)


class ResNetBlock(torch.nn.Module):
    """torchvision's ``BasicBlock`` or ``Bottleneck`` with the same submodules (same state_dict keys).

    With its BatchNorms in eval mode every conv -> BN -> ReLU is one ``conv2d_relu`` with the BN folded
    in (recomputed when weights or statistics change), and the last conv -> BN -> add -> ReLU passes the
    identity branch as the kernel's residual. With any BN in training mode it runs torchvision's math.
    """

    @staticmethod
    def supports(block) -> bool:
        pairs = ResNetBlock._pairs(block)
        return bool(pairs) and all(_foldable(getattr(block, c), getattr(block, b)) for c, b in pairs) and isinstance(block.relu, torch.nn.ReLU)

    @staticmethod
    def _pairs(block):
        names = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        return [(c, b) for c, b in names if hasattr(block, c) and hasattr(block, b)]

    def __init__(self, block: torch.nn.Module, *, backend: str | None = None) -> None:
        super().__init__()
        share_state(self, block)
        self.stride = block.stride
        if "downsample" not in self._modules:  # torchvision keeps downsample=None as a plain attribute
            self.downsample = None
        self.pairs = self._pairs(block)
        self.kind = type(block).__name__
        self._folds = [_FoldCache() for _ in self.pairs]
        self.backend = backend

    def extra_repr(self) -> str:
        fused = ", ".join(f"{c}+{b}+relu" for c, b in self.pairs[:-1]) + f", {'+'.join(self.pairs[-1])}+residual+relu"
        config = f"{self.kind}: {fused}"
        return config if self.backend is None else f"{config}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if any(getattr(self, b).training for _, b in self.pairs):  # batch statistics: torchvision's own math
            out = x
            for i, (c, b) in enumerate(self.pairs):
                out = getattr(self, b)(getattr(self, c)(out))
                out = self.relu(out + identity if i == len(self.pairs) - 1 else out)
            return out
        out = x
        for i, ((c, b), fold) in enumerate(zip(self.pairs, self._folds)):
            residual = identity if i == len(self.pairs) - 1 else None
            out = _conv_bn_relu(getattr(self, c), getattr(self, b), fold, out, residual, self.backend)
        return out


class _StemConv2d(torch.nn.Conv2d):
    """A ResNet stem's ``conv1`` (same weight) that, while the following BN is in eval mode, also
    applies that BN (folded) and the ReLU; the BN is held unregistered (its keys stay ``bn1.*``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn = self._stem_bn[0]
        if bn.training:
            return super().forward(input)
        return _conv_bn_relu(self, bn, self._fold, input, backend=self.backend)

    def extra_repr(self) -> str:
        fused = "batch_norm folded, relu"
        return f"{super().extra_repr()}, fused={fused}" + ("" if self.backend is None else f", backend={self.backend!r}")


class _FoldedBatchNorm2d(torch.nn.BatchNorm2d):
    """A ResNet stem's ``bn1`` (same parameters and statistics): the identity while in eval mode, where
    the stem conv has folded it in; a BatchNorm in training mode."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) if self.training else input

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded into the preceding conv in eval mode"


class _StemReLU(torch.nn.ReLU):
    """A ResNet stem's ``relu``: the identity while the stem conv applies it (bn1 in eval mode). Not
    merely idempotent there: an in-place ReLU on the fused conv's output would break its backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) if self._stem_bn[0].training else input


def fuse_resnet_stem(resnet, prefix, backend, report) -> None:
    """conv1 -> bn1 -> relu of a torchvision ResNet as one fused conv; bn1 and relu (only the stem uses
    the ResNet's own ``relu``) pass their input through while bn1 is in eval mode."""
    if type(resnet) is not _torchvision_class("ResNet"):
        return
    conv, bn = resnet.conv1, resnet.bn1
    if not (_foldable(conv, bn) and type(bn) is torch.nn.BatchNorm2d and isinstance(resnet.relu, torch.nn.ReLU)):
        return
    stem = _StemConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=conv.bias is not None, device="meta",
    )
    share_state(stem, conv)
    stem.backend, stem._fold = backend, _FoldCache()
    folded = _FoldedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    share_state(folded, bn)
    stem._stem_bn = [folded]  # a plain list: not a submodule, so no duplicate state_dict keys
    relu = _StemReLU(inplace=resnet.relu.inplace)
    relu._stem_bn = stem._stem_bn
    resnet.conv1, resnet.bn1, resnet.relu = stem, folded, relu
    report.replaced(prefix + "conv1", "Conv2d -> conv2d_relu with bn1 folded and relu fused")
    report.replaced(prefix + "bn1", "BatchNorm2d -> folded into conv1 (identity in eval mode)")
    report.replaced(prefix + "relu", "ReLU -> fused into conv1 (identity in eval mode)")
