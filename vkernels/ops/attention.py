"""Scaled dot-product attention (flash-style: the Lq x Lk scores never reach memory), forward and backward.

Each kernel backend has the ops ``vkernels::attention_<backend>`` (returning the output and the
row log-sum-exp the backward needs) and ``vkernels::attention_backward_<backend>``, with one schema
written here; the Triton ops are implemented here by ``vkernels.triton_kernels.attention``, the CUDA
ops in C++ (csrc/cuda/attention.cu). Both share the fake kernels and autograd below.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vkernels import dispatch
from vkernels.ops.library import autocast_inputs, backend_op, define_backend_ops
from vkernels.shapes import attention_batch_shape, attention_shape_class
from vkernels.triton_kernels import attention as triton_attention

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

SCHEMAS = {
    "attention": "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor)",
    "attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
    "Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
}
TRITON_LAUNCHERS = {
    "attention": triton_attention.attention_forward,
    "attention_backward": triton_attention.attention_backward,
}


def _attention_fake(query, key, value, attn_mask, is_causal, scale):
    batch, heads, query_len, _ = query.shape
    out = query.new_empty((batch, heads, query_len, value.shape[-1]))
    return out, query.new_empty((batch, heads, query_len), dtype=torch.float32)


def _attention_backward_fake(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _save_for_backward(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], attn_mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _register_autograd(backend: str) -> None:
    backward_op = backend_op("attention_backward", backend)

    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        grads = backward_op(grad_out, query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale)
        return *grads, None, None, None

    torch.library.register_autograd(f"vkernels::attention_{backend}", backward, setup_context=_save_for_backward)


define_backend_ops(SCHEMAS, {"attention": _attention_fake, "attention_backward": _attention_backward_fake}, TRITON_LAUNCHERS)
for _backend in dispatch.KERNEL_BACKENDS:
    _register_autograd(_backend)


def _kernel_limits(query, key, value, attn_mask, dropout_p) -> dict[str, str]:
    """Why each kernel backend cannot serve this call, for the inputs that only stock SDPA takes."""
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    shared = None
    if dropout_p > 0:
        shared = "dropout is not implemented in the kernels (use backend='torch')"
    elif not (0 < head_dim <= MAX_HEAD_DIM and 0 < value_dim <= MAX_HEAD_DIM):
        shared = f"head dims must be in 1..{MAX_HEAD_DIM}, got {head_dim} (query/key) and {value_dim} (value)"
    elif attn_mask is not None and attn_mask.requires_grad:
        shared = "the kernels give no gradient for attn_mask (a learned bias): use backend='torch'"
    elif attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        shared = f"attn_mask of dtype {attn_mask.dtype}: the kernels take bool, float32 or the query's dtype"
    if shared is not None:
        return {backend: shared for backend in dispatch.KERNEL_BACKENDS}
    if head_dim % 8 or value_dim % 8:
        return {"cuda": f"the CUDA kernels need head dims that are multiples of 8, got {head_dim} and {value_dim}"}
    return {}


def _as_4d(tensor: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """(B, H, L, E) view of a tensor with batch dims ``batch`` after broadcasting (stride 0 where it
    broadcasts: never copied). Other ranks than 4 are folded into B and H."""
    tensor = tensor.expand(*batch, *tensor.shape[-2:])
    if tensor.dim() < 4:
        return tensor[(None,) * (4 - tensor.dim())]
    return tensor.flatten(0, tensor.dim() - 4)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, flash-style.

    query (..., Lq, E), key (..., Lk, E), value (..., Lk, Ev), any strides (views out of a fused qkv
    projection are read in place); batch dims broadcast. ``attn_mask``: bool (True = attend) or
    additive float, broadcastable to (..., Lq, Lk) and never materialised (a key-padding mask
    (B, 1, 1, Lk) costs Lk elements per batch). ``is_causal`` is aligned top-left as in SDPA: query i
    attends key j iff j <= i, also when Lq != Lk. ``scale`` defaults to 1/sqrt(E).
    Unlike SDPA's math path, a query row whose keys are all masked gives zeros (and zero gradients)
    in the kernels, never NaN. ``dropout_p > 0`` and a mask that requires grad run on stock PyTorch
    under ``auto`` and are refused by a forced kernel backend.
    """
    if is_causal and attn_mask is not None:
        raise RuntimeError("attention: an explicit attn_mask should not be set when is_causal=True (as in SDPA)")
    limits = _kernel_limits(query, key, value, attn_mask, dropout_p)
    operands = autocast_inputs(query.device.type, query, key, value)
    chosen = dispatch.choose(backend, query.device, operands[0].dtype, DTYPES, limits, op="attention",
                             shape_class=attention_shape_class(query.shape, key.shape))
    if chosen == "torch":  # SDPA checks its own arguments and applies autocast itself
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    query, key, value = operands
    batch = attention_batch_shape(query, key, value, attn_mask)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    query_len, key_len = query.shape[-2], key.shape[-2]
    q, k, v = (_as_4d(t, batch) for t in (query, key, value))
    mask = None if attn_mask is None else _as_4d(attn_mask.expand(*batch, query_len, key_len), batch)
    if chosen == "cuda":  # the CUDA kernels read rows of the head dim as contiguous vectors
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = backend_op("attention", chosen)(q, k, v, mask, is_causal, scale)
    return out.view(*batch, query_len, value.shape[-1])
