"""``vkernels.patch``: rewrite an existing model's modules, in place, to run through vkernels ops.

It rewrites the model it is handed and nothing else (no class is patched process-wide). Every
replacement holds the *same* Parameter and buffer objects under the same names, so ``state_dict``
keys are unchanged, weights loaded later are seen, and optimizers built before or after keep working.

The walk (this file) is written once; what is replaced is data, one file per mechanism:

- ``modules``: ``torch.nn.MaxPool2d`` / ``AvgPool2d`` / ``AdaptiveAvgPool2d`` -> ``vkernels.nn``'s,
  same config; ``torch.nn.MultiheadAttention`` -> ``vkernels.nn.MultiheadAttention`` (open_clip's
  towers use it, calling it with ``need_weights=False``, which is what lets the kernels run).
- ``swin``: Swin's window attention (torchvision and timm, v1 and v2): the forward of the instance
  is replaced by one that attends the windows as batch entries of ``vkernels.attention``, with the
  shift mask per window and the learned relative-position bias per head (and its gradient).
- ``attention``: timm modules with a ``fused_attn`` path (ViT, DeiT, BEiT, EVA, DINOv2, ...): their
  own forward runs with ``F.scaled_dot_product_attention`` routed to ``vkernels.attention``; the
  rotary ones (EVA-02, DINOv3, naflexvit with RoPE) have their rotation done in the kernel.
- ``transformers``: Hugging Face models switch to the ``"vkernels"`` attention implementation
  registered in transformers' ``AttentionInterface`` (``attn_implementation="vkernels"`` works
  too, after ``vkernels.patch.transformers.register_attention()``); Qwen2-VL's and Qwen2.5-VL's
  vision attention runs one ``vkernels.varlen_attention`` per block, the 2-D RoPE in the kernel.
- ``conv``: every ``torch.nn.Conv2d`` -> ``vkernels.nn.Conv2dAct`` (no activation, same parameters),
  and the conv chains' recognisers and runner.
- ``fx``: the traced-graph pass. Each module's ``forward()`` is traced with torch.fx; every chain
  conv -> (BatchNorm) -> (drops) -> (+ residual) -> (activation) in it, written in the forward or
  spread over ``nn.Sequential``s (torchvision's ``Conv2dNormActivation``, timm's ``ConvNormAct``),
  becomes one ``vkernels.conv2d``: in eval mode with the BN folded into the conv's weights, in
  train mode (BN normalizes by batch statistics) the conv alone, the rest as before, so only exact
  rewrites happen there. The module's forward is replaced on the instance; its class, attributes
  and submodules stay. Modules torch.fx cannot trace are left as they are and reported.

Rules that replace a module or its forward match exact types only (a subclass may have changed
``forward``, so it is left alone); the SDPA routing and transformers' registry keep the model's own
forward, so they take subclasses too. Anything else is left as it is, so a model ``patch`` does not
understand keeps working unchanged.
"""
from __future__ import annotations

import torch

from vkernels.patch import attention, conv, fx, modules, swin, transformers
from vkernels.patch.report import Left, PatchReport

__all__ = ["PatchReport", "patch"]

# rule(module, backend) -> (replacement, description), Left(why) for a module it knows but cannot
# serve, or None; the first rule that answers wins.
MODULE_RULES = (
    modules.replace_pooling,
    modules.replace_multihead_attention,
    swin.window_attention_rule,
    attention.route_timm_attention,
    transformers.transformers_attention_rule,
    transformers.packed_vision_attention_rule,
    conv.replace_conv,
)
# rule(module, path_prefix, backend, report): rewires a module before the walk enters its children
# (for chains that span several children, such as conv -> BN -> ReLU in a forward()).
CONTAINER_RULES = (fx.fuse_conv_chains,)


def patch(model: torch.nn.Module, *, backend: str | None = None, report: bool = False):
    """Rewrite ``model`` in place so its convs (with their BN folded in eval mode, activations and
    residual adds fused), pooling and attention run through vkernels ops, and return it.

    ``backend`` is given to every replacement (``None``: chosen per call, see ``vkernels.use_backend``).
    With ``report=True`` returns ``(model, report)``, ``report`` a :class:`PatchReport`: a list of
    ``(path, what)`` pairs, one per rewritten module, ``path`` as in ``model.named_modules()`` (``""``
    for the model itself), and ``report.left``, the modules a rule knew but left stock, with why.
    If ``model`` itself is a replaced module (a bare ``nn.MultiheadAttention``, say), the returned
    object is its replacement, sharing its parameters: use the return value.
    """
    done = PatchReport()
    found = _replacement(model, "", backend, done)
    if found is not None:
        model = found
    _patch_children(model, "", backend, done, {})
    return (model, done) if report else model


def _patch_children(module, prefix, backend, report, memo):
    for rule in CONTAINER_RULES:
        rule(module, prefix, backend, report)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = prefix + name
        if id(child) in memo:  # a module registered twice gets one replacement
            new = memo[id(child)]
            if new is not child:
                module._modules[name] = new
            continue
        found = _replacement(child, path, backend, report)
        memo[id(child)] = child if found is None else found
        if found is not None:
            child = module._modules[name] = found
        _patch_children(child, path + ".", backend, report, memo)


def _replacement(module, path, backend, report):
    """The replacement from the first module rule that answers for ``module`` (recorded in
    ``report``), else ``None``."""
    for rule in MODULE_RULES:
        found = rule(module, backend)
        if isinstance(found, Left):
            report.leave(path, found.why)
            return None
        if found is not None:
            new, what = found
            report.replaced(path, what)
            return new
    return None
