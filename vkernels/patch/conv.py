"""Conv chains: conv -> (BatchNorm) -> (drops) -> (+ residual) -> (activation) as one ``vkernels.conv2d``.

What the rules recognise, by exact type (a subclass may have changed ``forward``):

- convs: ``torch.nn.Conv2d`` padding with zeros;
- norms: ``torch.nn.BatchNorm2d``, and timm's ``BatchNormAct2d`` (a BatchNorm2d that also applies its
  own ``act``) when its ``drop`` is an Identity;
- activations: the torch.nn modules of ``vkernels.nn.conv.ACTIVATION_MODULES``, timm's ``GELU`` /
  ``GELUTanh`` (they call ``F.gelu``), and the functional calls ``F.relu``/``relu6``/``leaky_relu``/
  ``hardswish``/``silu``/``gelu`` and ``x.relu()`` in a traced graph;
- drops: modules that are the identity in eval mode (``nn.Identity``, ``nn.Dropout*``, torchvision's
  ``StochasticDepth``, timm's ``DropPath`` / ``DropBlock2d``), which may sit between the norm and
  the add or the activation.

``run_conv_chain`` is what a rewritten ``forward()`` calls for each chain (see ``fx``). While the
BatchNorm uses running statistics and every drop is the identity (eval mode) it is one fused conv
with the BN folded in; otherwise (train mode) the conv runs alone through ``vkernels.conv2d`` and
the rest as the stock modules would, so the result is always the original one.

``replace_conv`` is the module rule for every conv, in or out of a chain: a
``vkernels.nn.Conv2dAct`` without activation, so code that calls the conv itself runs vkernels too.
"""
from __future__ import annotations

import operator
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from vkernels.nn.conv import ACTIVATION_MODULES, Conv2dAct, fold_batch_norm
from vkernels.ops.conv import ACTIVATIONS, conv2d
from vkernels.patch.common import loaded_class, share_state
from vkernels.patch.report import Left
from vkernels.shapes import conv2d_geometry

# functional activations in a traced graph -> the activation they compute
_ACTIVATION_CALLS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish", F.silu: "silu",
    F.gelu: "gelu", F.leaky_relu: "leaky_relu",
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}


def is_conv(module) -> bool:
    return type(module) is torch.nn.Conv2d and module.padding_mode == "zeros"


def _timm_activation(name: str):
    return loaded_class("timm.layers.activations", name)


def activation_of_module(module) -> tuple[str, float] | None:
    """(activation, negative_slope) of an activation module the fused conv computes, else None."""
    spec = ACTIVATION_MODULES.get(type(module))
    if spec is not None:
        return spec(module)
    if type(module) is _timm_activation("GELU"):
        return "gelu", 0.0
    if type(module) is _timm_activation("GELUTanh"):
        return "gelu_tanh", 0.0
    return None


def activation_of_call(node) -> tuple[str, float] | None:
    """(activation, negative_slope) of a torch.fx node calling a functional activation on one tensor
    (``inplace`` may be given: the fused conv writes a fresh tensor with the same values), else None."""
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACTIVATION_METHODS[node.target], 0.0
    if node.op != "call_function" or node.target not in _ACTIVATION_CALLS:
        return None
    name = _ACTIVATION_CALLS[node.target]
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)
    if name == "leaky_relu":
        slope = node.args[1] if len(node.args) > 1 else kwargs.pop("negative_slope", 0.01)
        extra = node.args[2:]
        return (name, slope) if isinstance(slope, float) and not kwargs and all(isinstance(a, bool) for a in extra) else None
    if name == "gelu":
        approximate = kwargs.pop("approximate", "none")
        if approximate == "tanh":
            name = "gelu_tanh"
        elif approximate != "none":
            return None
    extra = node.args[1:]  # F.relu(x, True): inplace given positionally
    return (name, 0.0) if not kwargs and all(isinstance(a, bool) for a in extra) else None


def _batch_norm_act():
    return loaded_class("timm.layers.norm_act", "BatchNormAct2d")


def is_norm(module) -> bool:
    """A BatchNorm the chain can fold (whether it may fold now is decided when the chain runs)."""
    if type(module) is torch.nn.BatchNorm2d:
        return True
    return (type(module) is _batch_norm_act() and type(module.drop) is torch.nn.Identity
            and (type(module.act) is torch.nn.Identity or activation_of_module(module.act) is not None))


def norm_activation(module) -> tuple[str, float] | None:
    """The activation a norm of ``is_norm`` applies itself (timm's BatchNormAct2d), or None."""
    if type(module) is _batch_norm_act() and type(module.act) is not torch.nn.Identity:
        return activation_of_module(module.act)
    return None


def _drop_classes():
    found = (loaded_class("torchvision.ops.stochastic_depth", "StochasticDepth"),
             loaded_class("timm.layers.drop", "DropPath"), loaded_class("timm.layers.drop", "DropBlock2d"))
    return {torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout2d, *(cls for cls in found if cls is not None)}


def is_drop(module) -> bool:
    """Whether the module is the identity in eval mode (run_conv_chain checks the mode when it runs)."""
    return type(module) in _drop_classes()


def is_residual_add(node) -> bool:
    """``a + b`` / ``a += b`` / ``torch.add(a, b)`` of two graph values (no alpha, no constants)."""
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
            and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, torch.fx.Node) for a in node.args))


class _FoldCache:
    """Folded weights per conv (weakly keyed), recomputed when any tensor of the conv or its BN changes
    (in-place updates bump ``_version``; ``.to()`` moves data). Folded every call where the fold must
    stay differentiable, under torch.compile and on fake tensors (no data to key on)."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, conv, bn):
        tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                or any(isinstance(t, FakeTensor) for t in tensors)):
            return fold_batch_norm(conv.weight, conv.bias, bn)
        key = (id(bn), bn.eps, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        entry = self._entries.get(conv)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, fold_batch_norm(conv.weight, conv.bias, bn))
            self._entries[conv] = entry
        return entry[1]


_FOLDED = _FoldCache()


def _identity_now(module) -> bool:
    return type(module) is torch.nn.Identity or not module.training


def _folds(norm) -> bool:
    return not norm.training and norm.running_mean is not None and norm.running_var is not None


def run_conv_chain(x, residual, conv, norm, drops, *, activation, negative_slope, activation_in_norm, backend):
    """``act(drops(norm(conv(x))) + residual)`` (each part optional) as the stock modules compute it:
    one ``vkernels.conv2d`` with the norm folded when it uses running statistics and the drops are
    identities; otherwise the conv through vkernels and the rest through the modules (exact in train
    mode). ``activation_in_norm``: the norm (timm's BatchNormAct2d) applies ``activation`` itself."""
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    fused = (norm is None or _folds(norm)) and all(_identity_now(d) for d in drops)
    if fused:
        weight, bias = (conv.weight, conv.bias) if norm is None else _FOLDED(conv, norm)
        if residual is not None:
            *_, size = conv2d_geometry(x.shape, weight.shape, None, *geometry)
            if tuple(residual.shape) != (*x.shape[:-3], weight.shape[0], *size):  # a broadcasting add: not ours
                out = conv2d(x, weight, bias, *geometry, backend=backend) + residual
                return out if activation is None else ACTIVATIONS[activation](out, negative_slope)
        return conv2d(x, weight, bias, *geometry, activation=activation, residual=residual,
                      negative_slope=negative_slope, backend=backend)
    out = conv2d(x, conv.weight, conv.bias, *geometry, backend=backend)
    if norm is not None:
        out = norm(out)
    for drop in drops:
        out = drop(out)
    if residual is not None:
        out = out + residual
    if activation is not None and not activation_in_norm:
        out = ACTIVATIONS[activation](out, negative_slope)
    return out


def replace_conv(module, backend):
    """Module rule: a stock conv -> ``vkernels.nn.Conv2dAct`` (no activation) with the same parameters.
    Other Conv2d subclasses stay: their forward may differ (timm's Conv2dSame pads at run time)."""
    if isinstance(module, Conv2dAct) or not isinstance(module, torch.nn.Conv2d):
        return None
    if type(module) is not torch.nn.Conv2d:
        return Left(f"{type(module).__name__} is a Conv2d subclass with its own forward; left stock")
    if module.padding_mode != "zeros":
        return Left(f"padding_mode={module.padding_mode!r}: the kernels pad with zeros only")
    new = Conv2dAct(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, bias=module.bias is not None, device="meta", backend=backend)
    return share_state(new, module), "Conv2d -> vkernels.nn.Conv2dAct"
