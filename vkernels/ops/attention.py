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
(``vkernels.shapes.empty_attention_output``). ``rotary_cos`` / ``rotary_sin`` (None, or tables of
rotary_dim columns broadcastable to (B0, B1, H, L, R)) rotate q and k inside the kernels
(``vkernels.rotary``'s convention; ``rotary_interleaved`` picks the layout); Lq == Lk then.

``vkernels::varlen_attention_<backend>`` attends within each sequence of a packed batch: query
(total_q, Hq, D), key and value (total_k, Hkv, .) with Hq a multiple of Hkv (query head h reads
key/value head h // (Hq / Hkv)), sequence b in rows cu_seqlens[b] to cu_seqlens[b + 1] (int32,
contiguous; checked before any kernel runs), ``max_seqlen`` at least every sequence's length,
rotary tables (total_q, R), or (total_q, Hq, R) with Hq == Hkv (total_q == total_k). It returns out (total_q, Hq,
Dv) and lse (Hq, total_q) float32, both contiguous; ``varlen_attention_backward_<backend>`` returns
dq, dk, dv, contiguous.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vkernels import dispatch
from vkernels.ops.library import autocast_inputs, backend_op, define_backend_ops
from vkernels.rotary import apply_rotary
from vkernels.shapes import (attention_batch_shape, attention_rotary_tables, attention_shape_class,
                             empty_attention_output, fold_attention_batch, check_packed_attention_inputs,
                             packed_rotary_tables, packed_sequence_bounds)
from vkernels.triton_kernels import attention as triton_attention

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

ROTARY_ARGUMENTS = "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False"
SCHEMAS = {
    "attention": "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? attn_bias, bool is_causal, "
    f"float scale, {ROTARY_ARGUMENTS}) -> (Tensor, Tensor)",
    "attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
    f"Tensor? attn_mask, Tensor? attn_bias, bool is_causal, float scale, bool bias_requires_grad, {ROTARY_ARGUMENTS}) "
    "-> (Tensor, Tensor, Tensor, Tensor?)",
    "varlen_attention": "(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    f"int max_seqlen_q, int max_seqlen_k, bool is_causal, float scale, {ROTARY_ARGUMENTS}) -> (Tensor, Tensor)",
    "varlen_attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool is_causal, float scale, "
    f"{ROTARY_ARGUMENTS}) -> (Tensor, Tensor, Tensor)",
}


def _checked_varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                            rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """The Triton varlen forward after packed_sequence_bounds' checks of cu_seqlens' values: here, in
    the op, so that they run under torch.compile too (the op is opaque to it)."""
    packed_sequence_bounds(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0], max_seqlen_q, max_seqlen_k)
    return triton_attention.varlen_attention_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k, is_causal, scale, rotary_cos, rotary_sin,
                                                     rotary_interleaved)


TRITON_LAUNCHERS = {
    "attention": triton_attention.attention_forward,
    "attention_backward": triton_attention.attention_backward,
    "varlen_attention": _checked_varlen_forward,
    "varlen_attention_backward": triton_attention.varlen_attention_backward,
}
def _attention_fake(query, key, value, attn_mask, attn_bias, is_causal, scale, rotary_cos=None, rotary_sin=None,
                    rotary_interleaved=False):
    lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
    return empty_attention_output(query, value.shape[-1]), lse


def _attention_backward_fake(grad_out, query, key, value, out, lse, attn_mask, attn_bias, is_causal, scale,
                             bias_requires_grad, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    grad_bias = attn_bias.new_empty(attn_bias.shape) if bias_requires_grad else None
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_bias


def _varlen_attention_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                           rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    out = query.new_empty((*query.shape[:2], value.shape[-1]))
    return out, query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)


def _varlen_attention_backward_fake(grad_out, query, key, value, out, lse, *args, **kwargs):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


FAKES = {"attention": _attention_fake, "attention_backward": _attention_backward_fake,
         "varlen_attention": _varlen_attention_fake, "varlen_attention_backward": _varlen_attention_backward_fake}


def _save_for_backward(ctx, inputs, output):
    query, key, value, attn_mask, attn_bias, is_causal, scale, rotary_cos, rotary_sin, rotary_interleaved = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], attn_mask, attn_bias, rotary_cos, rotary_sin)
    ctx.is_causal, ctx.scale, ctx.rotary_interleaved = is_causal, scale, rotary_interleaved


def _register_autograd(backend: str) -> None:
    backward_op = backend_op("attention_backward", backend)

    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, attn_mask, attn_bias, rotary_cos, rotary_sin = ctx.saved_tensors
        bias_requires_grad = attn_bias is not None and ctx.needs_input_grad[4]
        *grads, grad_bias = backward_op(grad_out, query, key, value, out, lse, attn_mask, attn_bias, ctx.is_causal,
                                        ctx.scale, bias_requires_grad, rotary_cos, rotary_sin, ctx.rotary_interleaved)
        # no gradient for the rotary tables: the public functions rotate learned ones before the op
        return *grads, None, grad_bias, None, None, None, None, None

    torch.library.register_autograd(f"vkernels::attention_{backend}", backward, setup_context=_save_for_backward)


def _save_varlen_for_backward(ctx, inputs, output):
    (query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, rotary_cos,
     rotary_sin, rotary_interleaved) = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], cu_seqlens_q, cu_seqlens_k, rotary_cos, rotary_sin)
    ctx.arguments = (max_seqlen_q, max_seqlen_k, is_causal, scale)
    ctx.rotary_interleaved = rotary_interleaved


def _register_varlen_autograd(backend: str) -> None:
    backward_op = backend_op("varlen_attention_backward", backend)

    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, rotary_cos, rotary_sin = ctx.saved_tensors
        grads = backward_op(grad_out, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.arguments,
                            rotary_cos, rotary_sin, ctx.rotary_interleaved)
        return *grads, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(f"vkernels::varlen_attention_{backend}", backward,
                                    setup_context=_save_varlen_for_backward)


define_backend_ops(SCHEMAS, FAKES, TRITON_LAUNCHERS)
for _backend in dispatch.KERNEL_BACKENDS:
    _register_autograd(_backend)
    _register_varlen_autograd(_backend)


def _kernel_limits(query, key, value, attn_mask, attn_bias, dropout_p, rotary=None,
                   rotary_interleaved=False) -> dict[str, str]:
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
    if head_dim % 8 or value_dim % 8:
        return {"cuda": f"the CUDA kernels need head dims that are multiples of 8, got {head_dim} and {value_dim}"}
    rotary_dim = 0 if rotary is None else rotary[0].shape[-1]
    if not rotary_interleaved and rotary_dim > 128 and max(head_dim, value_dim) > 128:
        # csrc/cuda/attention.cu: dK is accumulated in 128-column slices there, and un-rotated per slice
        return {"cuda": f"the CUDA kernels take rotate-half tables of more than 128 columns (got {rotary_dim}) only "
                        "with head dims of at most 128: use backend='triton' or rotary_interleaved"}
    return {}


def _sdpa_mask(attn_mask: torch.Tensor | None, attn_bias: torch.Tensor | None) -> torch.Tensor | None:
    """attn_mask and attn_bias as SDPA's one attn_mask (their broadcast sum, materialised)."""
    if attn_bias is None or attn_mask is None:
        return attn_bias if attn_mask is None else attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask + attn_bias


def _learned(rotary) -> bool:
    """Tables that require grad (RoPE-Mixed's learned frequencies): the kernels give them no gradient,
    so the public functions rotate q and k in PyTorch first and call the kernels without them."""
    return rotary is not None and torch.is_grad_enabled() and any(t.requires_grad for t in rotary)


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
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotary_interleaved: bool = False,
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
    ``rotary=(cos, sin)`` (not in SDPA): rotary embeddings applied to q and k inside the kernels, in
    fp32, forward and backward; the result is that of rotating first (``vkernels.rotary``) and
    attending after. Tables have rotary_dim columns (even, <= E; later columns pass unrotated) and
    one row per position (Lq == Lk): (L, R), (B, L, R) per batch entry (Hugging Face's position
    embeddings), or any shape of query's rank broadcastable to (..., L, R), per head included.
    ``rotary_interleaved`` picks the GPT-J pairs layout over rotate-half. Tables that require grad
    are applied in PyTorch before the kernels (which give them no gradient).
    Unlike SDPA's math path, a query row whose keys are all masked gives zeros (and zero gradients)
    in the kernels, never NaN. ``dropout_p > 0`` runs on stock PyTorch under ``auto`` and is refused
    by a forced kernel backend.
    """
    if is_causal and (attn_mask is not None or attn_bias is not None):
        raise RuntimeError("attention: an explicit attn_mask should not be set when is_causal=True (as in SDPA)")
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad and torch.is_grad_enabled():
        # learned: the bias input, the one the kernels give a gradient
        attn_mask, attn_bias = None, attn_mask if attn_bias is None else attn_bias + attn_mask
    if rotary is not None:
        attention_batch_shape(query, key, value, attn_mask, attn_bias)  # ranks, dtypes, devices first
        rotary = attention_rotary_tables(rotary, query, key)
        if _learned(rotary):
            query, key = (apply_rotary(t, *rotary, rotary_interleaved) for t in (query, key))
            rotary = None
    limits = _kernel_limits(query, key, value, attn_mask, attn_bias, dropout_p, rotary, rotary_interleaved)
    operands = autocast_inputs(query.device.type, query, key, value)
    chosen = dispatch.choose(backend, query.device, operands[0].dtype, DTYPES, limits, op="attention",
                             shape_class=attention_shape_class(query.shape, key.shape))
    if chosen == "torch":  # SDPA checks its own arguments and applies autocast itself
        if rotary is not None:
            query, key = (apply_rotary(t, *rotary, rotary_interleaved) for t in (query, key))
        mask = _sdpa_mask(attn_mask, attn_bias)
        return F.scaled_dot_product_attention(query, key, value, mask, dropout_p, is_causal, scale=scale)
    query, key, value = operands
    batch = attention_batch_shape(query, key, value, attn_mask, attn_bias)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    levels, (q, k, v, mask, bias, cos, sin) = fold_attention_batch(
        batch, (query, key, value, attn_mask, attn_bias, *(rotary or (None, None))))
    q, k, v = (t.expand(*levels, *t.shape[-2:]) for t in (q, k, v))
    out, _ = backend_op("attention", chosen)(q, k, v, mask, bias, is_causal, scale, cos, sin, rotary_interleaved)
    return out.view(*batch, query.shape[-2], value.shape[-1])


def _keys_per_table_head(query, key, value, cos):
    """Per-head tables (total, Hq, R) with grouped key/value heads rotate k once per query head: k and
    v repeated to Hq heads (a copy; the kernels take grouped heads with shared tables only)."""
    if cos.dim() == 3 and cos.shape[1] != 1 and key.shape[1] != query.shape[1]:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], 1) for t in (key, value))
    return key, value


def _rotated_packed(query, key, value, cos, sin, rotary_interleaved):
    """Packed q and k rotated in PyTorch by tables (total, R) or (total, Hq, R)."""
    key, value = _keys_per_table_head(query, key, value, cos)
    cos, sin = (t if t.dim() == 3 else t[:, None] for t in (cos, sin))
    query, key = (apply_rotary(t, cos, sin, rotary_interleaved) for t in (query, key))
    return query, key, value


def _packed_sdpa(query, key, value, bounds_q, bounds_k, is_causal, scale):
    """Stock PyTorch for varlen_attention (what HF's vision towers run without FlashAttention-2): one
    SDPA call per sequence; a sequence without keys gives zeros, as in the kernels."""
    outs = []
    for q_start, q_end, k_start, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        q, k, v = (t.transpose(0, 1) for t in (query[q_start:q_end], key[k_start:k_end], value[k_start:k_end]))
        if k_end == k_start:
            outs.append(query.new_zeros((q_end - q_start, query.shape[1], value.shape[-1])))
            continue
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                             enable_gqa=q.shape[0] != k.shape[0])
        outs.append(out.transpose(0, 1))
    return torch.cat(outs) if outs else query.new_empty((0, query.shape[1], value.shape[-1]))


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotary_interleaved: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each sequence of a packed batch (FlashAttention's ``flash_attn_varlen_func``):
    images of different sizes as one token sequence, no attention across a boundary.

    query (total_q, Hq, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv), any strides; Hq a
    multiple of Hkv (grouped-query heads: query head h reads key/value head h // (Hq / Hkv)).
    ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 (or int64) cumulative boundaries [0, n1, n1 + n2, ...,
    total], one length (batch + 1); sequences may be empty or one token long. ``max_seqlen_q`` /
    ``max_seqlen_k``: at least the longest sequence (None: read from cu_seqlens, a device-to-host
    copy; pass them under torch.compile). ``is_causal`` is aligned top-left within each sequence, as
    SDPA aligns it; ``scale`` defaults to 1/sqrt(D). ``rotary=(cos, sin)``: tables (total_q, R) or
    (total_q, Hq, R), one row per token (total_q == total_k), applied to q and k inside the kernels as
    in :func:`attention`. Returns (total_q, Hq, Dv) in the inputs' dtype. One kernel launch serves
    every sequence: the work is the sum of the squared lengths, not batch x longest^2. The backward is
    deterministic. Bad boundaries (not starting at 0, decreasing, not ending at the total, longer
    than max_seqlen) raise a ValueError before any kernel runs.
    """
    check_packed_attention_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k)
    cu_seqlens_q, cu_seqlens_k = (t.to(torch.int32).contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
    if max_seqlen_q is None or max_seqlen_k is None:
        bounds_q, bounds_k = packed_sequence_bounds(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0])
        longest = [max([end - start for start, end in zip(b, b[1:])], default=0) for b in (bounds_q, bounds_k)]
        max_seqlen_q = longest[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = longest[1] if max_seqlen_k is None else max_seqlen_k
    for name, longest in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(longest, bool) or not isinstance(longest, (int, torch.SymInt)) or longest < 0:
            raise ValueError(f"varlen_attention: {name} must be a non-negative int, got {longest!r}")
    if rotary is not None:
        rotary = packed_rotary_tables(rotary, query, key)
        if _learned(rotary):
            query, key, value = _rotated_packed(query, key, value, *rotary, rotary_interleaved)
            rotary = None
        else:
            key, value = _keys_per_table_head(query, key, value, rotary[0])
    limits = _kernel_limits(query, key, value, None, None, 0.0, rotary, rotary_interleaved)
    operands = autocast_inputs(query.device.type, query, key, value)
    head_dim = query.shape[-1]
    chosen = dispatch.choose(backend, query.device, operands[0].dtype, DTYPES, limits, op="varlen_attention",
                             shape_class=attention_shape_class((max_seqlen_q, head_dim), (max_seqlen_k, head_dim)))
    query, key, value = operands
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if chosen == "torch":
        bounds = packed_sequence_bounds(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0], max_seqlen_q,
                                        max_seqlen_k)
        if rotary is not None:
            query, key, value = _rotated_packed(query, key, value, *rotary, rotary_interleaved)
        return _packed_sdpa(query, key, value, *bounds, is_causal, scale)
    cos, sin = rotary or (None, None)
    out, _ = backend_op("varlen_attention", chosen)(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k, is_causal, scale, cos, sin, rotary_interleaved)
    return out
