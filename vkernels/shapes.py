"""Shape rules, written once and used by every backend, the fake kernels and the public functions.

Each rule follows the one PyTorch applies (aten/src/ATen/native/Pool.h), so that sizes and error
messages match ``torch.nn.functional``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a 1- or 2-sequence as two ints, the way F.max_pool2d reads kernel_size, stride..."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise RuntimeError(f"{name} must either be a single int, or a tuple of two ints")
    return value


def pool_stride(stride, kernel_size: tuple[int, int], name: str) -> tuple[int, int]:
    """A pooling stride as torch reads it: None or an empty sequence means the kernel size."""
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        return kernel_size
    return pair(stride, name)


def pool_output_size(size: int, kernel: int, pad: int, stride: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of one pooling axis; with ceil_mode the last window must start inside the input
    or its left padding."""
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def check_pool_input(input: torch.Tensor, name: str) -> None:
    """3-D (C, H, W) or 4-D (N, C, H, W) with non-empty C, H, W; the batch may be empty."""
    if name == "avg_pool2d" and input.dim() < 3:
        # torch's avg_pool2d reads input.size(-3) before checking the rank
        raise IndexError(f"Dimension out of range (expected to be in range of [{-input.dim()}, {input.dim() - 1}], but got -3)")
    if input.dim() not in (3, 4) or any(s == 0 for s in input.shape[-3:]):
        raise RuntimeError(
            f"{name}: non-empty 3D or 4D (batch mode) tensor expected for input, "
            f"but got a tensor of shape {tuple(input.shape)}"
        )


def pool2d_output_size(
    input_size: Sequence[int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
) -> tuple[int, int]:
    """Validated (OH, OW) of a max/avg pooling window over an (H, W) input."""
    height, width = input_size[-2], input_size[-1]
    if min(kernel_size) <= 0:
        raise RuntimeError(f"kernel size should be greater than zero, but got kernel_size={kernel_size}")
    if min(stride) <= 0:
        raise RuntimeError("stride should not be zero")
    if min(dilation) <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got dilation={dilation}")
    if min(padding) < 0:
        raise RuntimeError(f"pad must be non-negative, but got padding={padding}")
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        axis = 0 if padding[0] > kernel_size[0] // 2 else 1
        raise RuntimeError(
            f"pad should be at most half of effective kernel size, but got pad={padding[axis]}, "
            f"kernel_size={kernel_size[axis]} and dilation={dilation[axis]}"
        )
    out = tuple(
        pool_output_size(size, k, p, s, d, ceil_mode)
        for size, k, p, s, d in zip((height, width), kernel_size, padding, stride, dilation)
    )
    if min(out) < 1:
        raise RuntimeError(
            f"Given input size: ({'x'.join(str(s) for s in input_size[-3:])}). "
            f"Calculated output size: ({input_size[-3]}x{out[0]}x{out[1]}). Output size is too small"
        )
    return out


def adaptive_output_size(input_size: Sequence[int], output_size: int | None | Sequence[int | None]) -> tuple[int, int]:
    """F.adaptive_avg_pool2d's output_size: an int, or a pair whose None entries keep the input size."""
    if output_size is None or isinstance(output_size, int):
        output_size = (output_size, output_size)
    if len(output_size) != 2:
        raise RuntimeError(f"adaptive_avg_pool2d: output_size must be 2, but got {len(output_size)}")
    out = tuple(int(input_size[i - 2]) if o is None else int(o) for i, o in enumerate(output_size))
    if min(out) < 0:
        raise RuntimeError(f"adaptive_avg_pool2d: elements of output_size must be greater than or equal to 0 but received {out}")
    return out


def adaptive_window(index: int, in_size: int, out_size: int) -> tuple[int, int]:
    """[start, end) of adaptive pooling window ``index``: floor(i*in/out) to ceil((i+1)*in/out)."""
    return (index * in_size) // out_size, math.ceil((index + 1) * in_size / out_size)


def adaptive_max_window(in_size: int, out_size: int) -> int:
    """Longest adaptive window along one axis: the bound a kernel loops to."""
    return max(end - start for start, end in (adaptive_window(i, in_size, out_size) for i in range(out_size)))


def is_channels_last(tensor: torch.Tensor) -> bool:
    """True when the tensor's memory is NHWC: pooling output keeps the input's memory format."""
    return (
        tensor.dim() == 4
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=torch.channels_last)
    )


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def window_index_dtype(window_elements: int) -> torch.dtype:
    """Smallest integer type holding a position inside a pooling window. Max-pool saves this for its
    backward instead of int64 input indices: 1 byte per output instead of 8."""
    if window_elements <= torch.iinfo(torch.int8).max + 1:
        return torch.int8
    if window_elements <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    return torch.int32


def attention_batch_shape(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None = None,
) -> tuple[int, ...]:
    """The batch dims (..., before L and E) of scaled dot-product attention, after the checks SDPA makes:
    ranks >= 2, one dtype and device, key and query head dims equal, key and value lengths equal,
    batch dims broadcastable, a bool or float mask (and a float bias) broadcastable to (..., Lq, Lk)."""
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(
            "attention: expected query, key and value to be at least 2-dimensional, got "
            f"query.dim={query.dim()}, key.dim={key.dim()}, value.dim={value.dim()}"
        )
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError(f"attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not query.device == key.device == value.device:
        raise RuntimeError(f"attention: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"attention: query and key head dims differ: {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"attention: key and value lengths differ: {key.shape[-2]} and {value.shape[-2]}")
    try:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError as error:
        raise RuntimeError(
            f"attention: batch dims of query {tuple(query.shape[:-2])}, key {tuple(key.shape[:-2])} and "
            f"value {tuple(value.shape[:-2])} do not broadcast"
        ) from error
    scores = (*batch, query.shape[-2], key.shape[-2])
    for name, mask in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if mask is None:
            continue
        if not mask.is_floating_point() and (name == "attn_bias" or mask.dtype != torch.bool):
            kinds = "floating point" if name == "attn_bias" else "bool or floating point"
            raise RuntimeError(f"attention: {name} must be {kinds}, got {mask.dtype}")
        if mask.device != query.device:
            raise RuntimeError(f"attention: {name} is on {mask.device}, query on {query.device}")
        try:
            if torch.broadcast_shapes(mask.shape, scores) != scores:
                raise RuntimeError
        except RuntimeError as error:
            raise RuntimeError(f"attention: {name} of shape {tuple(mask.shape)} does not broadcast to {scores}") from error
    return tuple(batch)


def attention_rotary_tables(
    rotary, query: torch.Tensor, key: torch.Tensor, name: str = "attention"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary=(cos, sin)`` of ``vkernels.attention`` as views that broadcast against query (..., L,
    E) and key: (L, R) shared, (B, L, R) per batch entry and shared by the heads (Hugging Face's
    position embeddings) when query has 4 or more dims, else any shape broadcastable to (*batch dims,
    L, R). R (rotary_dim) even and at most E; query and key of the same length L."""
    cos, sin = _rotary_pair(rotary, query, name)
    rows, rotary_dim = cos.shape[-2:] if cos.dim() >= 2 else (None, None)
    if query.shape[-2] != key.shape[-2]:
        raise ValueError(f"{name}: rotary embeddings need query and key of one length (the tables' rows are "
                         f"their positions), got {query.shape[-2]} and {key.shape[-2]}")
    if cos.dim() < 2 or rows != query.shape[-2]:
        raise ValueError(f"{name}: rotary tables of shape {tuple(cos.shape)} do not have the query's "
                         f"{query.shape[-2]} rows (positions) before their rotary_dim columns")
    _check_rotary_dim(rotary_dim, query.shape[-1], name)
    if query.dim() >= 4 and cos.dim() == query.dim() - 1:  # (B, L, R): per batch entry, shared by the heads
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    try:
        torch.broadcast_shapes(cos.shape[:-2], query.shape[:-2])
    except RuntimeError as error:
        raise ValueError(f"{name}: rotary tables of shape {tuple(cos.shape)} do not broadcast against the query's "
                         f"batch dims {tuple(query.shape[:-2])}") from error
    if cos.dim() > max(query.dim(), 2):
        raise ValueError(f"{name}: rotary tables of shape {tuple(cos.shape)} have more dims than the query")
    return cos, sin


def packed_rotary_tables(rotary, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary=(cos, sin)`` of ``vkernels.varlen_attention``: (total, R) shared by the heads or
    (total, Hq, R) per query head, one row per token of query and of key (the same count), R even and
    at most the head dim."""
    cos, sin = _rotary_pair(rotary, query, "varlen_attention")
    if query.shape[0] != key.shape[0]:
        raise ValueError("varlen_attention: rotary embeddings need as many key tokens as query tokens (the "
                         f"tables' rows are their positions), got {query.shape[0]} and {key.shape[0]}")
    if cos.dim() not in (2, 3) or cos.shape[0] != query.shape[0] or (cos.dim() == 3 and cos.shape[1] != query.shape[1]):
        raise ValueError(f"varlen_attention: rotary tables must be (total, rotary_dim) or (total, heads, rotary_dim) = "
                         f"({query.shape[0]}, [{query.shape[1]},] R), got {tuple(cos.shape)}")
    _check_rotary_dim(cos.shape[-1], query.shape[-1], "varlen_attention")
    return cos, sin


def _rotary_pair(rotary, query: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary)):
        raise ValueError(f"{name}: rotary must be a pair of tensors (cos, sin), got {type(rotary).__name__}")
    cos, sin = rotary
    if cos.shape != sin.shape:
        raise ValueError(f"{name}: rotary cos and sin differ in shape: {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"{name}: rotary tables must be floating point, got {cos.dtype} and {sin.dtype}")
    if cos.device != query.device or sin.device != query.device:
        raise ValueError(f"{name}: rotary tables are on {cos.device} and {sin.device}, query on {query.device}")
    return cos, sin


def _check_rotary_dim(rotary_dim: int, head_dim: int, name: str) -> None:
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"{name}: rotary_dim (the tables' last dim) must be even and in 2..{head_dim} (the head dim), "
                         f"got {rotary_dim}")


def check_packed_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> None:
    """The checks of ``varlen_attention``'s inputs that need no values of cu_seqlens: query (total_q,
    Hq, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv), one dtype and device, Hq a multiple of Hkv;
    cu_seqlens 1-D int32 or int64 on that device, of one length."""
    if not query.dim() == key.dim() == value.dim() == 3:
        raise RuntimeError("varlen_attention: expected query, key and value of 3 dims (total, heads, head_dim), got "
                           f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError(f"varlen_attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                           f"{value.dtype}")
    if not query.device == key.device == value.device:
        raise RuntimeError(f"varlen_attention: query, key and value must be on one device, got {query.device}, "
                           f"{key.device}, {value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"varlen_attention: query and key head dims differ: {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[:2] != value.shape[:2]:
        raise RuntimeError(f"varlen_attention: key {tuple(key.shape)} and value {tuple(value.shape)} differ in tokens or heads")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise RuntimeError(f"varlen_attention: query heads ({query.shape[1]}) must be a multiple of key/value heads "
                           f"({key.shape[1]})")
    for name, cu_seqlens in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"varlen_attention: {name} must be an int32 or int64 tensor, got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
            raise ValueError(f"varlen_attention: {name} must be 1-D with batch + 1 >= 1 entries, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != query.device:
            raise ValueError(f"varlen_attention: {name} is on {cu_seqlens.device}, query on {query.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")


def packed_sequence_bounds(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                           max_seqlen_q: int | None = None, max_seqlen_k: int | None = None) -> tuple[list[int], list[int]]:
    """The values of cu_seqlens_q and cu_seqlens_k (one copy to the host), after checking that each
    starts at 0, never decreases and ends at its total, and that no sequence is longer than its
    max_seqlen (None: not checked). Raises ValueError saying which."""
    bounds = torch.cat([cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64)]).tolist()
    bounds_q, bounds_k = bounds[:cu_seqlens_q.numel()], bounds[cu_seqlens_q.numel():]
    for name, values, total, longest in (("cu_seqlens_q", bounds_q, total_q, max_seqlen_q),
                                         ("cu_seqlens_k", bounds_k, total_k, max_seqlen_k)):
        if values[0] != 0:
            raise ValueError(f"varlen_attention: {name} must start at 0, got {values[0]}")
        lengths = [end - start for start, end in zip(values, values[1:])]
        if any(length < 0 for length in lengths):
            raise ValueError(f"varlen_attention: {name} decreases (at entry {[l < 0 for l in lengths].index(True) + 1}): "
                             f"{values}")
        if values[-1] != total:
            raise ValueError(f"varlen_attention: {name} must end at the total token count {total}, got {values[-1]}")
        if longest is not None and lengths and max(lengths) > longest:
            raise ValueError(f"varlen_attention: max_seqlen_{name[-1]} = {longest} is smaller than a sequence of "
                             f"{max(lengths)} tokens")
    return bounds_q, bounds_k


def fold_attention_batch(
    batch: tuple[int, ...], tensors: Sequence[torch.Tensor | None]
) -> tuple[tuple[int, int, int], list[torch.Tensor | None]]:
    """Three batch levels (B0, B1, H) for attention over the batch dims ``batch``, and ``tensors``
    (query, key, value, masks: each (*its batch dims, X, Y), broadcastable to batch) as 5-D views
    over them, of size 1 on a level where the tensor broadcasts.

    H is batch's last dim when there are two or more (the heads of (B, H, L, E); never merged, so that
    an output laid out (..., L, H, E) keeps that layout for the caller), else 1. The leading dims fold
    into B0 and B1: dims of size 1 drop out, and adjacent dims merge when every tensor views them as
    one (both broadcast, or both full with nesting strides). (B, H) folds to (1, B, H); windows of
    an image batch, (B, nW, H) with a per-window mask, keep three levels. When more than two leading
    groups remain, the first ones merge by reshaping the broadcast tensors: a copy, and for a bias a
    full-size gradient that autograd then reduces."""
    heads = batch[-1] if len(batch) >= 2 else 1
    leading = range(len(batch) - 1) if len(batch) >= 2 else range(len(batch))
    aligned = [None if t is None else t.view((1,) * (len(batch) + 2 - t.dim()) + tuple(t.shape)) for t in tensors]

    def mergeable(t, first, second):
        full = t.shape[first] != 1, t.shape[second] != 1
        return full[0] == full[1] and (not full[0] or t.stride(first) == t.stride(second) * t.shape[second])

    groups: list[list[int]] = []
    for dim in [d for d in leading if batch[d] != 1]:
        if groups and all([t is None or mergeable(t, groups[-1][-1], dim) for t in aligned]):
            groups[-1].append(dim)
        else:
            groups.append([dim])
    if len(groups) > 2:
        merged = [d for group in groups[:-1] for d in group]
        aligned = [None if t is None else _expand_dims(t, merged, batch) for t in aligned]
        groups = [merged, groups[-1]]
    groups = [[]] * (2 - len(groups)) + groups
    # (lists, not generators, inside math.prod and all: torch.compile traces these)
    levels = (math.prod([batch[d] for d in groups[0]]), math.prod([batch[d] for d in groups[1]]), heads)

    def level_view(t):
        sizes = [math.prod([t.shape[d] for d in group]) for group in groups]
        own_heads = t.shape[len(batch) - 1] if len(batch) >= 2 else 1
        return t.reshape(*sizes, own_heads, *t.shape[-2:])

    return levels, [None if t is None else level_view(t) for t in aligned]


def _expand_dims(tensor: torch.Tensor, dims: Sequence[int], batch: tuple[int, ...]) -> torch.Tensor:
    sizes = list(tensor.shape)
    for d in dims:
        sizes[d] = batch[d]
    return tensor.expand(sizes)


def empty_attention_output(query: torch.Tensor, value_dim: int) -> torch.Tensor:
    """Attention's output for ``query`` (..., H, Lq, E): shaped (..., H, Lq, value_dim) in query's dtype,
    laid out (..., Lq, H, value_dim) in memory as FlashAttention's, so that the (B, L, H * E) view
    every ViT takes next costs no copy. Contiguous for queries of fewer than 4 dims."""
    if query.dim() < 4:
        return query.new_empty((*query.shape[:-1], value_dim))
    *batch, heads, seq_q, _ = query.shape
    return query.new_empty((*batch, seq_q, heads, value_dim)).transpose(-3, -2)


def conv2d_geometry(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    bias_shape: Sequence[int] | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validated (stride, padding (top, left), dilation, output size) of F.conv2d's arguments.

    ``padding`` may be an int, a pair, ``'valid'`` or ``'same'``; for 'same' with an even effective
    kernel torch pads one more row/column at the bottom/right, which the output size carries.
    """
    if len(input_shape) not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(input_shape)}"
        )
    if len(weight_shape) != 4:
        raise RuntimeError(f"conv2d: expected a 4-D weight (Cout, Cin/groups, KH, KW), got size {list(weight_shape)}")
    stride, dilation = pair(stride, "conv2d: stride"), pair(dilation, "conv2d: dilation")
    if min(stride) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation) <= 0:
        raise RuntimeError("non-positive dilation is not supported")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    out_channels, group_channels, *kernel = weight_shape
    in_channels, height, width = input_shape[-3:]
    if out_channels % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but got weight of size {list(weight_shape)} instead")
    if in_channels != group_channels * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(weight_shape)}, expected input{list(input_shape)} to have "
            f"{group_channels * groups} channels, but got {in_channels} channels instead"
        )
    if bias_shape is not None and tuple(bias_shape) != (out_channels,):
        raise RuntimeError(
            f"Given weight of size {list(weight_shape)}, expected bias to be 1-dimensional with {out_channels} "
            f"elements, but got bias of size {list(bias_shape)} instead"
        )
    effective = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        if stride != (1, 1):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        # torch puts the odd row/column of 'same' padding at the bottom/right
        padding = tuple((e - 1) // 2 for e in effective)
        return stride, padding, dilation, (height, width)
    elif isinstance(padding, str):
        raise RuntimeError(f"Invalid padding string: {padding!r}")
    else:
        padding = pair(padding, "conv2d: padding")
        if min(padding) < 0:
            raise RuntimeError("negative padding is not supported")
    padded = (height + 2 * padding[0], width + 2 * padding[1])
    if effective[0] > padded[0] or effective[1] > padded[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({effective[0]} x {effective[1]}). Kernel size can't be greater than actual input size"
        )
    output = tuple((p - e) // s + 1 for p, e, s in zip(padded, effective, stride))
    return stride, padding, dilation, output


# Shape classes: inputs whose backends rank differently in the benchmarks get their own preference
# order (vkernels/verified.json); the benchmark cases and the public functions classify alike.


def attention_shape_class(query_shape: Sequence[int], key_shape: Sequence[int]) -> str:
    """"vit" up to 1024 tokens (ViT's 50 to 577), "long" beyond (the 2048-token anchors). Any rank:
    the public function checks ranks after it has chosen a backend."""
    tokens = max((shape[-2] for shape in (query_shape, key_shape) if len(shape) >= 2), default=0)
    return "vit" if tokens <= 1024 else "long"


def conv_shape_class(kernel_size: Sequence[int], groups: int, in_channels: int) -> str:
    """"1x1" (a plain GEMM), "depthwise", or "spatial" (3x3, the 7x7 stem, ...)."""
    if groups > 1 and groups == in_channels:
        return "depthwise"
    return "1x1" if tuple(kernel_size) == (1, 1) else "spatial"
