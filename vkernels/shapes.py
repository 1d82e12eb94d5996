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
