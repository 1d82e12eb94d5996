"""Scaled dot-product attention (flash-style: the Lq x Lk scores never reach memory), forward and
backward, with an additive bias that may be learned (its gradient is summed over the dims it
broadcasts over, in the kernels).

Each kernel backend has the ops ``vkernels::attention_<backend>`` (returning the output and the
row log-sum-exp the backward needs) and ``vkernels::attention_backward_<backend>``, with one schema
written here; the Triton ops are implemented here by ``vkernels.triton_kernels.attention``, the CUDA
ops in C++ (csrc/cuda/attention.cu). Both share the fake kernels and autograd below.

The ops take query, key, value as (B0, B1, H, L, E) (or (B, H, L, E)): three batch levels, so that
windows of an image batch (Swin: B0 images, B1 windows) index a per-window mask and a per-head bias
without copies. ``attn_mask`` (bool, True = attend, or additive float) and ``attn_bias`` (additive
float) broadcast to (B0, B1, H, Lq, Lk) through size-1 dims and are added in one pass;
``grad_attn_bias`` has attn_bias's own shape. The output is laid out (B0, B1, Lq, H, Ev) in memory
(``vkernels.shapes.empty_attention_output``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vkernels import dispatch
from vkernels.ops.library import autocast_inputs, backend_op, define_backend_ops
from vkernels.shapes import attention_batch_shape, attention_shape_class, empty_attention_output, fold_attention_batch
from vkernels.triton_kernels import attention as triton_attention

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

SCHEMAS = {
    "attention": "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? attn_bias, bool is_causal, "
    "float scale) -> (Tensor, Tensor)",
    "attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
    "Tensor? attn_mask, Tensor? attn_bias, bool is_causal, float scale, bool bias_requires_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor?)",
}
TRITON_LAUNCHERS = {
    "attention": triton_attention.attention_forward,
    "attention_backward": triton_attention.attention_backward,
}
# csrc/cuda/attention.cu still implements the schemas from before attn_bias (issue 13's phase 2
# ports it to SCHEMAS and deletes these): (B, H) batches, a (B, H, Lq, Lk) mask view, a contiguous
# output. Until then _kernel_limits refuses attn_bias on CUDA and _cuda_attention adapts the rest.
CUDA_SCHEMAS_BEFORE_BIAS = {
    "attention": "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor)",
    "attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
    "Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
}


def _attention_fake(query, key, value, attn_mask, attn_bias, is_causal, scale):
    lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
    return empty_attention_output(query, value.shape[-1]), lse


def _attention_backward_fake(grad_out, query, key, value, out, lse, attn_mask, attn_bias, is_causal, scale,
                             bias_requires_grad):
    grad_bias = attn_bias.new_empty(attn_bias.shape) if bias_requires_grad else None
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_bias


def _save_for_backward(ctx, inputs, output):
    query, key, value, attn_mask, attn_bias, is_causal, scale = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], attn_mask, attn_bias)
    ctx.is_causal, ctx.scale = is_causal, scale


def _register_autograd(backend: str) -> None:
    backward_op = backend_op("attention_backward", backend)

    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, attn_mask, attn_bias = ctx.saved_tensors
        bias_requires_grad = attn_bias is not None and ctx.needs_input_grad[4]
        *grads, grad_bias = backward_op(grad_out, query, key, value, out, lse, attn_mask, attn_bias, ctx.is_causal,
                                        ctx.scale, bias_requires_grad)
        return *grads, None, grad_bias, None, None

    torch.library.register_autograd(f"vkernels::attention_{backend}", backward, setup_context=_save_for_backward)


def _cuda_fake_before_bias(query, key, value, attn_mask, is_causal, scale):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, query.new_empty(query.shape[:-1], dtype=torch.float32)


def _cuda_backward_fake_before_bias(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _cuda_save_before_bias(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], attn_mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _cuda_backward_before_bias(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, attn_mask = ctx.saved_tensors
    grads = backend_op("attention_backward", "cuda")(grad_out, query, key, value, out, lse, attn_mask, ctx.is_causal,
                                                     ctx.scale)
    return *grads, None, None, None


define_backend_ops(SCHEMAS, {"attention": _attention_fake, "attention_backward": _attention_backward_fake},
                   TRITON_LAUNCHERS, backends=("triton",))
_register_autograd("triton")
define_backend_ops(CUDA_SCHEMAS_BEFORE_BIAS, {"attention": _cuda_fake_before_bias,
                                              "attention_backward": _cuda_backward_fake_before_bias}, {}, backends=("cuda",))
torch.library.register_autograd("vkernels::attention_cuda", _cuda_backward_before_bias,
                                setup_context=_cuda_save_before_bias)


def _kernel_limits(query, key, value, attn_mask, attn_bias, dropout_p) -> dict[str, str]:
    """Why each kernel backend cannot serve this call, for the inputs that only stock SDPA takes."""
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    shared = None
    if dropout_p > 0:
        shared = "dropout is not implemented in the kernels (use backend='torch')"
    elif not (0 < head_dim <= MAX_HEAD_DIM and 0 < value_dim <= MAX_HEAD_DIM):
        shared = f"head dims must be in 1..{MAX_HEAD_DIM}, got {head_dim} (query/key) and {value_dim} (value)"
    elif attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        shared = f"attn_mask of dtype {attn_mask.dtype}: the kernels take bool, float32 or the query's dtype"
    elif attn_bias is not None and attn_bias.dtype not in (torch.float32, query.dtype):
        shared = f"attn_bias of dtype {attn_bias.dtype}: the kernels take float32 or the query's dtype"
    if shared is not None:
        return {backend: shared for backend in dispatch.KERNEL_BACKENDS}
    if attn_bias is not None:
        return {"cuda": "the CUDA kernels take no learned bias (an attn_mask that requires grad, or attn_bias) "
                        "before issue 13's phase 2: use backend='triton' or 'torch'"}
    if head_dim % 8 or value_dim % 8:
        return {"cuda": f"the CUDA kernels need head dims that are multiples of 8, got {head_dim} and {value_dim}"}
    return {}


def _sdpa_mask(attn_mask: torch.Tensor | None, attn_bias: torch.Tensor | None) -> torch.Tensor | None:
    """attn_mask and attn_bias as SDPA's one attn_mask (their broadcast sum, materialised)."""
    if attn_bias is None or attn_mask is None:
        return attn_bias if attn_mask is None else attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask + attn_bias


def _cuda_attention(q, k, v, mask, is_causal, scale):
    """The CUDA op before issue 13's phase 2, on the (B0, B1, H) levels: B0 and B1 flattened (a copy
    where they do not nest), the mask as a full (B, H, Lq, Lk) view, rows of q, k, v contiguous."""
    if mask is not None:
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    q, k, v, mask = (None if t is None else t.reshape(-1, *t.shape[2:]) for t in (q, k, v, mask))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return backend_op("attention", "cuda")(q, k, v, mask, is_causal, scale)[0]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    attn_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, flash-style.

    query (..., Lq, E), key (..., Lk, E), value (..., Lk, Ev), any strides (views out of a fused qkv
    projection are read in place); batch dims broadcast. ``attn_mask``: bool (True = attend) or
    additive float, broadcastable to (..., Lq, Lk) and never materialised (a key-padding mask
    (B, 1, 1, Lk) costs Lk elements per batch). An additive ``attn_mask`` that requires grad (a
    learned relative-position bias, say) gets SDPA's gradient, summed in the kernels over the dims it
    broadcasts over. ``attn_bias`` (not in SDPA): a second additive float mask, learned or not,
    added in the same pass, so that a shift mask and a learned bias need not be summed into a
    full-size tensor first (``attn_mask + attn_bias`` for SDPA). ``is_causal`` is aligned top-left
    as in SDPA: query i attends key j iff j <= i, also when Lq != Lk. ``scale`` defaults to
    1/sqrt(E). With four or more dims the result is laid out (..., Lq, H, Ev) in memory (H the dim
    before Lq), as FlashAttention's: ``out.transpose(-3, -2)`` is contiguous.
    Unlike SDPA's math path, a query row whose keys are all masked gives zeros (and zero gradients)
    in the kernels, never NaN. ``dropout_p > 0`` runs on stock PyTorch under ``auto`` and is refused
    by a forced kernel backend.
    """
    if is_causal and (attn_mask is not None or attn_bias is not None):
        raise RuntimeError("attention: an explicit attn_mask should not be set when is_causal=True (as in SDPA)")
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad and torch.is_grad_enabled():
        # learned: the bias input, the one the kernels give a gradient
        attn_mask, attn_bias = None, attn_mask if attn_bias is None else attn_bias + attn_mask
    limits = _kernel_limits(query, key, value, attn_mask, attn_bias, dropout_p)
    operands = autocast_inputs(query.device.type, query, key, value)
    chosen = dispatch.choose(backend, query.device, operands[0].dtype, DTYPES, limits, op="attention",
                             shape_class=attention_shape_class(query.shape, key.shape))
    if chosen == "torch":  # SDPA checks its own arguments and applies autocast itself
        mask = _sdpa_mask(attn_mask, attn_bias)
        return F.scaled_dot_product_attention(query, key, value, mask, dropout_p, is_causal, scale=scale)
    query, key, value = operands
    batch = attention_batch_shape(query, key, value, attn_mask, attn_bias)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    levels, (q, k, v, mask, bias) = fold_attention_batch(batch, (query, key, value, attn_mask, attn_bias))
    q, k, v = (t.expand(*levels, *t.shape[-2:]) for t in (q, k, v))
    if chosen == "cuda":
        out = _cuda_attention(q, k, v, mask, is_causal, scale)
    else:
        out, _ = backend_op("attention", chosen)(q, k, v, mask, bias, is_causal, scale)
    return out.view(*batch, query.shape[-2], value.shape[-1])
