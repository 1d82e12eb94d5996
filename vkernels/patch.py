"""``vkernels.patch``: rewrite an existing model's modules, in place, to run through vkernels ops.

It rewrites the model it is handed and nothing else (no class is patched process-wide). Every
replacement holds the *same* Parameter and buffer objects under the same names, so ``state_dict``
keys are unchanged, weights loaded later are seen, and optimizers built before or after keep working.

What is replaced (exact types only; a subclass may have changed ``forward``, so it is left alone):

- ``torch.nn.MaxPool2d`` / ``AvgPool2d`` / ``AdaptiveAvgPool2d`` -> ``vkernels.nn``'s, same config.
- ``torch.nn.MultiheadAttention`` -> ``vkernels.nn.MultiheadAttention`` (open_clip's towers use it,
  calling it with ``need_weights=False``, which is what lets the kernels run).
- timm's ``Attention`` (ViT) -> :class:`TimmAttention`: the attention core runs through
  ``vkernels.attention`` on strided views of the qkv projection.
- torchvision ``BasicBlock`` / ``Bottleneck`` whose BatchNorms are in eval mode ->
  :class:`ResNetBlock`: conv -> BN -> ReLU is one ``conv2d_relu`` with the BN folded into the
  weights, and the last conv -> BN -> add -> ReLU uses the kernel's residual epilogue. The ResNet stem
  (``conv1`` / ``bn1`` / ``relu``) likewise. Patch after ``.eval()``: in train mode BN normalizes by
  batch statistics, nothing folds, and blocks are left alone; a block patched in eval mode and put
  back in train mode runs torchvision's own math.

Anything else is left as it is, so a model ``patch`` does not understand keeps working unchanged.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from vkernels.nn.attention import MultiheadAttention
from vkernels.nn.conv import fold_batch_norm
from vkernels.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from vkernels.ops.attention import attention
from vkernels.ops.conv import conv2d_relu

__all__ = ["ResNetBlock", "TimmAttention", "patch"]


def patch(model: torch.nn.Module, *, backend: str | None = None, report: bool = False):
    """Rewrite ``model`` in place so its pooling, attention and (eval-mode) conv -> BN -> ReLU run
    through vkernels ops, and return it.

    ``backend`` is given to every replacement (``None``: chosen per call, see ``vkernels.use_backend``).
    With ``report=True`` returns ``(model, replaced)``, ``replaced`` a list of ``(path, what)`` pairs,
    one per rewritten module, ``path`` as in ``model.named_modules()`` (``""`` for the model itself).
    If ``model`` itself is a replaced module (a bare ``nn.MultiheadAttention``, say), the returned
    object is its replacement, sharing its parameters: use the return value.
    """
    replaced: list[tuple[str, str]] = []
    found = _replacement(model, backend)
    if found is not None:
        model, what = found
        replaced.append(("", what))
    _patch_children(model, "", backend, replaced, {})
    return (model, replaced) if report else model


# ----------------------------------------------------------------------------------------- the walk


def _patch_children(module, prefix, backend, replaced, memo):
    resnet = _torchvision_class("ResNet")
    if resnet is not None and type(module) is resnet:
        _fuse_resnet_stem(module, prefix, backend, replaced)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = prefix + name
        if id(child) in memo:  # a module registered twice gets one replacement
            new = memo[id(child)]
            if new is not child:
                module._modules[name] = new
            continue
        found = _replacement(child, backend)
        memo[id(child)] = child if found is None else found[0]
        if found is not None:
            child, what = found
            module._modules[name] = child
            replaced.append((path, what))
        _patch_children(child, path + ".", backend, replaced, memo)


def _replacement(module, backend):
    """``(new_module, description)`` for a module a rule covers, else ``None``."""
    kind = type(module)
    if kind in _POOLING:
        new = _POOLING[kind](module, backend)
        return new, f"{kind.__name__} -> vkernels.nn.{type(new).__name__}"
    if kind is torch.nn.MultiheadAttention:
        return _multihead_attention(module, backend), "MultiheadAttention -> vkernels.nn.MultiheadAttention"
    if kind in _timm_attention_classes() and TimmAttention.supports(module):
        return TimmAttention(module, backend=backend), f"timm {kind.__name__} -> vkernels.patch.TimmAttention"
    if kind in (_torchvision_class("BasicBlock"), _torchvision_class("Bottleneck")) and ResNetBlock.supports(module):
        new = ResNetBlock(module, backend=backend)
        return new, f"torchvision {kind.__name__} -> vkernels.patch.ResNetBlock ({new.extra_repr()})"
    return None


def _torchvision_class(name):
    """torchvision's ResNet classes if torchvision is imported (a torchvision model means it is)."""
    resnet = sys.modules.get("torchvision.models.resnet")
    return getattr(resnet, name, None)


def _timm_attention_classes():
    """timm's ViT attention class: ``timm.layers.attention.Attention`` in timm >= 1.0, defined in
    ``timm.models.vision_transformer`` before that."""
    found = set()
    for module_name in ("timm.layers.attention", "timm.models.vision_transformer"):
        cls = getattr(sys.modules.get(module_name), "Attention", None)
        if isinstance(cls, type):
            found.add(cls)
    return found


def _share_state(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Register ``old``'s Parameter, buffer and child objects (not copies) under the same names."""
    for name, param in old._parameters.items():
        new._parameters[name] = param
    for name, buffer in old._buffers.items():
        new._buffers[name] = buffer
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        new._modules[name] = child
    new.training = old.training
    return new


# -------------------------------------------------------------------------------- pooling and MHA


def _max_pool(m, backend):
    return _share_state(MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode, backend=backend), m)


def _avg_pool(m, backend):
    return _share_state(
        AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override, backend=backend), m
    )


def _adaptive_avg_pool(m, backend):
    return _share_state(AdaptiveAvgPool2d(m.output_size, backend=backend), m)


_POOLING = {
    torch.nn.MaxPool2d: _max_pool,
    torch.nn.AvgPool2d: _avg_pool,
    torch.nn.AdaptiveAvgPool2d: _adaptive_avg_pool,
}


def _multihead_attention(m: torch.nn.MultiheadAttention, backend) -> MultiheadAttention:
    # Built on the meta device (no allocation), then given the original parameters and out_proj.
    new = MultiheadAttention(
        m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
        add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
        batch_first=m.batch_first, device="meta", backend=backend,
    )
    return _share_state(new, m)


# ------------------------------------------------------------------------------------ timm ViT


class TimmAttention(torch.nn.Module):
    """timm's ViT ``Attention`` with the same submodules (``qkv``, ``q_norm``, ``k_norm``,
    ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``; so the same state_dict keys) whose
    attention core is ``vkernels.attention`` on strided (no-copy) views of the qkv output.

    Attention dropout in training (``attn_drop.p > 0``) has no kernel: those calls run SDPA.
    """

    _KNOWN_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}

    @classmethod
    def supports(cls, module) -> bool:
        required = all(hasattr(module, name) for name in ("qkv", "proj", "num_heads", "fused_attn"))
        return required and set(module._modules) <= cls._KNOWN_CHILDREN and isinstance(module.qkv, torch.nn.Linear)

    def __init__(self, module: torch.nn.Module, *, backend: str | None = None) -> None:
        super().__init__()
        _share_state(self, module)
        self.num_heads = module.num_heads
        self.attn_dim = getattr(module, "attn_dim", module.qkv.out_features // 3)
        self.head_dim = getattr(module, "head_dim", self.attn_dim // self.num_heads)
        self.scale = getattr(module, "scale", self.head_dim**-0.5)
        self.fused_attn = module.fused_attn
        if "gate" not in self._modules:
            self.gate = None
        self.backend = backend

    def extra_repr(self) -> str:
        config = f"num_heads={self.num_heads}, head_dim={self.head_dim}"
        return config if self.backend is None else f"{config}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3, H, D) -> three (B, H, N, D) views of the one projection output
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if dropout_p > 0:  # the kernels have no dropout
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale)
        else:
            out = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        if "norm" in self._modules:  # timm's scale_norm (Identity unless enabled; absent in older timm)
            out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    @staticmethod
    def _norm(norm, x):
        return x if isinstance(norm, torch.nn.Identity) else norm(x)


# ----------------------------------------------------------------------------- torchvision ResNet


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
        _share_state(self, block)
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


def _fuse_resnet_stem(resnet, prefix, backend, replaced) -> None:
    """conv1 -> bn1 -> relu of a torchvision ResNet as one fused conv; bn1 and relu (only the stem uses
    the ResNet's own ``relu``) pass their input through while bn1 is in eval mode."""
    conv, bn = resnet.conv1, resnet.bn1
    if not (_foldable(conv, bn) and type(bn) is torch.nn.BatchNorm2d and isinstance(resnet.relu, torch.nn.ReLU)):
        return
    stem = _StemConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=conv.bias is not None, device="meta",
    )
    _share_state(stem, conv)
    stem.backend, stem._fold = backend, _FoldCache()
    folded = _FoldedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    _share_state(folded, bn)
    stem._stem_bn = [folded]  # a plain list: not a submodule, so no duplicate state_dict keys
    relu = _StemReLU(inplace=resnet.relu.inplace)
    relu._stem_bn = stem._stem_bn
    resnet.conv1, resnet.bn1, resnet.relu = stem, folded, relu
    replaced.append((prefix + "conv1", "Conv2d -> conv2d_relu with bn1 folded and relu fused"))
    replaced.append((prefix + "bn1", "BatchNorm2d -> folded into conv1 (identity in eval mode)"))
    replaced.append((prefix + "relu", "ReLU -> fused into conv1 (identity in eval mode)"))
