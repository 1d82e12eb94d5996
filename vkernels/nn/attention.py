"""MultiheadAttention: torch.nn.MultiheadAttention's constructor, parameters and state, with the
attention itself run by ``vkernels.attention`` (flash-style: no (L, S) weights in memory)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vkernels.nn._backend import _BackendChoice
from vkernels.ops.attention import attention


def _heads_first(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(B, L, H, D) or (L, B, H, D) -> a (B, H, L, D) view (no copy)."""
    return x.permute(0, 2, 1, 3) if batch_first else x.permute(1, 2, 0, 3)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A torch-MHA mask (bool True = masked out, or float additive) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def _merged_mask(
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    query_len: int,
    key_len: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """torch MHA's key-padding and attention masks as one SDPA-convention mask (bool True = attend,
    or additive float) broadcastable to (B, H, L, S): (B, 1, 1, S) for a key-padding mask alone,
    (1, 1, L, S) for a 2-D attn_mask, (B, H, L, S) only for a 3-D one."""
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
            raise AssertionError(f"only bool and floating types of {name} are supported")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, key_len):
            raise AssertionError(f"expected key_padding_mask of shape {(batch, key_len)}, got {tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.view(batch, 1, 1, key_len)
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (query_len, key_len):
            attn_mask = attn_mask.view(1, 1, query_len, key_len)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (batch * heads, query_len, key_len):
            attn_mask = attn_mask.view(batch, heads, query_len, key_len)
        else:
            raise RuntimeError(
                f"attn_mask of shape {tuple(attn_mask.shape)}: expected {(query_len, key_len)} or "
                f"{(batch * heads, query_len, key_len)}"
            )
    masks = [m for m in (key_padding_mask, attn_mask) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        # torch masks where True; the kernels attend where True. Both masked = -inf + -inf in torch.
        allowed = [~m for m in masks]
        return allowed[0] if len(allowed) == 1 else allowed[0] & allowed[1]
    merged = _additive(masks[0], dtype)
    return merged if len(masks) == 1 else merged + _additive(masks[1], dtype)


class MultiheadAttention(_BackendChoice, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` plus ``backend=``; same parameters, state_dict and results.

    ``forward`` never returns attention weights from the kernels: ``need_weights=True`` (torch's
    default) runs torch's own forward, so pass ``need_weights=False`` to use vkernels. A query whose
    keys are all masked gives zeros on the kernel backends where torch gives NaN.
    """

    def extra_repr(self) -> str:  # torch's MultiheadAttention has no extra_repr of its own
        return "" if self.backend is None else f"backend={self.backend!r}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            need_weights  # the kernels never form the (L, S) weights
            or (self.dropout > 0 and self.training)  # no dropout in the kernels
            or self.bias_k is not None or self.add_zero_attn  # extra key columns: torch's path
            or not self._qkv_same_embed_dim  # separate q/k/v weights of other widths
            or query.is_nested
        ):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )

        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(
                f"expected query, key and value all 2-D (unbatched) or all 3-D, got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        batched = query.dim() == 3
        batch_first = self.batch_first
        if not batched:  # one sequence: a batch of one, batch dim placed as batch_first says
            dim = 0 if batch_first else 1
            same_kv, self_attention = key is value, query is key and key is value
            query = query.unsqueeze(dim)
            key = query if self_attention else key.unsqueeze(dim)
            value = key if same_kv else value.unsqueeze(dim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        embed_dim, heads = self.embed_dim, self.num_heads
        head_dim = embed_dim // heads
        if query.shape[-1] != embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {embed_dim}, but got {query.shape[-1]}")
        if key.shape != value.shape:
            raise AssertionError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")

        # Packed projections stay packed: q/k/v are strided views of one linear's output.
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, weight, bias).unflatten(-1, (3, heads, head_dim)).unbind(-3)
        else:
            w_q, w_kv = weight.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = (None, None) if bias is None else bias.split([embed_dim, 2 * embed_dim])
            q = F.linear(query, w_q, b_q).unflatten(-1, (heads, head_dim))
            if key is value:
                k, v = F.linear(key, w_kv, b_kv).unflatten(-1, (2, heads, head_dim)).unbind(-3)
            else:
                w_k, w_v = w_kv.chunk(2)
                b_k, b_v = (None, None) if b_kv is None else b_kv.chunk(2)
                k = F.linear(key, w_k, b_k).unflatten(-1, (heads, head_dim))
                v = F.linear(value, w_v, b_v).unflatten(-1, (heads, head_dim))
        q, k, v = (_heads_first(x, batch_first) for x in (q, k, v))
        batch, _, query_len, _ = q.shape
        key_len = k.shape[2]

        # torch MHA takes is_causal only as a hint about attn_mask, which it requires: with no
        # key-padding mask it drops attn_mask and runs causal; with one it merges both and is not causal.
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None:
            attn_mask = None
        else:
            is_causal = False
        mask = _merged_mask(key_padding_mask, attn_mask, batch, heads, query_len, key_len, q.dtype)

        out = attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend=self.backend)  # (B, H, L, D)
        out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0 if batch_first else 1)
        return out, None
