"""Flash attention in Triton: a forward with online softmax and a deterministic backward, with the
gradient of a learned additive bias, packed variable-length batches, grouped key/value heads and
rotary embeddings applied inside the kernels.

Shapes: query (B0, B1, B2, Lq, D), key (B0, B1, B2 / G, Lk, D), value (B0, B1, B2 / G, Lk, Dv) (4-D
inputs are taken as B0 = 1), read through any strides: three batch levels so that windows of an image
batch (Swin: B0 images, B1 windows, B2 heads) index a per-window mask and a per-head bias without
copies. G = kv_group query heads share a key/value head (head h reads key head h // G). ``mask`` is
None or broadcastable to (B0, B1, B2, Lq, Lk), bool (True = attend) or additive float; ``bias`` is
None or an additive float broadcastable the same way, added with the mask in the same pass; both are
read through stride-0 views where they broadcast. ``is_causal`` is top-left aligned as in torch SDPA:
query i attends key j iff j <= i, whatever Lq and Lk are.

Packed batches (varlen): query (total_q, Hq, D), key and value (total_k, Hkv, ·) hold B sequences
back to back, sequence b in rows cu_seqlens[b] to cu_seqlens[b + 1] (int32); the kernels see them as
B1 = B entries of stride 0 whose programs find their rows and lengths in cu_seqlens, so one launch
serves every sequence and a program past its sequence's end returns at once: the work is
sum(n_b^2), not B * max(n_b)^2. No attention crosses a sequence boundary; causality is per sequence.

Rotary embeddings: q and k are rotated as they are loaded, in fp32, by tables cos and sin of
ROTARY_DIM columns (<= D, even; columns past it pass unrotated) indexed by the same row (token) as
q or k: x * cos + rotate(x) * sin, where rotate(x) is (-x2, x1) for the halves x1, x2 of the rotary
columns (``rotate_half``, GPT-NeoX / Hugging Face / timm) or (-x1, x0, -x3, x2, ...) for interleaved
pairs (GPT-J / Meta); the rotated values are rounded to the input dtype before the matmuls, as the
models round them. The backward rotates dq and dk back (the rotation's transpose) before it writes
them. The kernels keep their own head-dim order (_rotary_columns) in which each rotary pair is two
neighbouring columns, so both layouts rotate in registers; q and k are permuted alike, which leaves
q . k as it is. Tables broadcast like masks (one per token, or per head, or per batch entry).

lse convention: ``lse[b, i]`` is the natural-log log-sum-exp over keys of the scaled, masked logits
``scale * q_i . k_j + mask_ij + bias_ij`` (torch's ``logsumexp``), in float32. A row whose every key
is masked gets out = 0 and lse = +inf, so that exp(s - lse) = 0 and the backward gives it zero
gradients. Internally the kernels work in base 2 (scores carry a factor log2(e), softmax uses exp2).
The output is laid out (B0, B1, Lq, B2, Dv) in memory, as FlashAttention's: a (B, H, L, D) result
transposed to (B, L, H * D), as every ViT does next, is a view. Packed: out (total_q, Hq, Dv) and
lse (Hq, total_q), both contiguous.

Tiling follows FlashAttention-2: a forward program owns BLOCK_M query rows and streams key blocks;
the backward computes delta = rowsum(dO * O), then one kernel owns a key block of one key/value head
and loops over the G query heads sharing it (in head order) and their query blocks for dK, dV, and
another owns a query block and loops over key blocks for dQ. The bias gradient dS = P * (dP - delta)
is summed over the batch entries, rows and columns the bias broadcasts over by a fourth kernel: a
program owns one tile of the bias for a fixed chunk of those entries and recomputes S and dP for
each (two of the backward's seven matmuls again), summing in entry order; the chunks' partial sums
are then added in chunk order (_bias_grad_chunks). Every output element is written by one program in
a fixed order: no atomics, bitwise deterministic. Sequences rarely fill their last block (ViT
lengths: 50, 197, 257, 577): the loops cross it in quarter-block steps and the program owning it
takes a quarter-size tile when the rest fits one (_tiled_config). Those small tiles run on mma.sync
(wgmma needs 64 rows), and each kernel compiles both tile sizes.

Head dims are split into at most two power-of-two chunks (80 = 64 + 16, 40 = 32 + 16) that are
loaded and multiplied separately, so 80 costs 80 (not 128) columns of matmul work.
"""
import torch
import triton
import triton.language as tl

from vkernels.shapes import empty_attention_output
from vkernels.triton_kernels.autotuning import INTERPRETED, autotune

LOG2E = tl.constexpr(1.4426950408889634)
NO_MASK = tl.constexpr(0)
BOOL_MASK = tl.constexpr(1)
ADDITIVE_MASK = tl.constexpr(2)


def _head_dim_chunks(dim: int) -> tuple[int, int]:
    """At most two power-of-two chunks covering ``dim`` (second 0 when one suffices), each >= 16,
    the smallest extent tl.dot takes on tensor cores."""
    first = max(16, 1 << (dim.bit_length() - 1))
    rest = dim - first
    return first, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


# ---------------------------------------------------------------------------------------------
# Autotuning: a few (BLOCK_M, BLOCK_N, num_warps, num_stages) per class of head dim and mask, picked
# to fit sm_90's shared memory and registers (bench/compile_check.py: the first config of a class
# spills nothing at the ViT head dims; some alternatives spill a little, for the autotuner to weigh).
# BLOCK_M is the query tile, BLOCK_N the key tile. The interpreter gets one small config, so CPU runs
# never benchmark.


def _config_class(args) -> str:
    width = max(args["D0"] + args["D1"], args["DV0"] + args["DV1"])
    name = "d64" if width <= 64 else "d128" if width <= 128 else "d256"
    if args["DOT_PRECISION"] == "ieee":  # fp32: CUDA-core dots holding fp32 tiles, keep them small
        return "fp32" if name == "d64" else f"fp32-{name}"
    # a full (query x key) mask or bias tile costs registers: smaller key tiles ("-masks": both, as Swin's)
    full_tiles = sum(args[f"{kind}_KIND"] != NO_MASK.value and not args[f"{kind}_PER_KEY"] for kind in ("MASK", "BIAS"))
    # so do the rotary tables' fp32 tiles of every q or k tile loaded
    return name + ("", "-mask", "-masks")[full_tiles] + ("-rope" if args["ROTARY_DIM"] else "")


def _tiled_config(block_m: int, block_n: int, **options) -> triton.Config:
    """A config of BLOCK_M query x BLOCK_N key tiles, with the tail sizes TAIL_M and TAIL_N: a quarter
    block, at least 16 (tl.dot's smallest extent). A kernel's loop crosses the streamed sequence's
    last, partial block in tail steps, and the program that owns a sequence's last block takes a
    tail-sized tile when the rest fits in one, so that e.g. 257 queries x 257 keys in 128-blocks cost
    288 x 288 of work instead of 384 x 384, and 50 keys 64 columns instead of 128."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "TAIL_M": max(16, block_m // 4),
                          "TAIL_N": max(16, block_n // 4)}, **options)


def _autotuned(interpreted: tuple[int, int], table: dict[str, list[tuple[int, int, int, int]]], extra_key=()):
    if INTERPRETED:
        return autotune([_tiled_config(*interpreted)], key=[])
    by_class = {
        name: [_tiled_config(m, n, num_warps=w, num_stages=s) for m, n, w, s in rows]
        for name, rows in table.items()
    }

    def configs_for_class(configs, args):
        # a class without its own row falls back to fewer masks ("-masks", "-mask", none), then drops
        # "-rope" (the rotary tiles cost more registers than a mask tile: keep their smaller tiles)
        name = _config_class(args)
        masked = name.removesuffix("-rope")
        fewer_masks = dict.fromkeys((masked, masked.removesuffix("s"), masked.split("-mask")[0]))
        for rope in dict.fromkeys((name[len(masked):], "")):
            for candidate in fewer_masks:
                if candidate + rope in by_class:
                    return by_class[candidate + rope]
        raise AssertionError(f"no autotune configs for class {name}")

    return autotune(
        [config for rows in by_class.values() for config in rows],
        key=["seq_q", "seq_k", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "MASK_PER_KEY", "BIAS_KIND", "BIAS_PER_KEY",
             "ROTARY_DIM", "IS_CAUSAL", *extra_key],
        sizes=("seq_q", "seq_k"),
        prune=configs_for_class,
    )


_FORWARD_CONFIGS = {
    "d64": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
    "d64-mask": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2)],
    "d64-masks": [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
    "d128": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3)],
    "d128-mask": [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2)],
    # rotary at D128: 128-key tiles spill and overflow shared memory (bench/compile_check.py, sm_90 bf16)
    "d128-rope": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)],
    "d256": [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    "d256-mask": [(64, 32, 8, 2), (32, 32, 4, 2)],
    "fp32": [(32, 32, 4, 2), (32, 64, 8, 2), (32, 16, 4, 2), (32, 32, 8, 2)],
    # wider fp32 heads: 32-key tiles spill kilobytes per thread (bench/compile_check.py), 16-key ones none
    "fp32-d128": [(32, 16, 8, 2), (16, 16, 4, 2), (32, 32, 8, 1), (16, 32, 8, 1)],
    "fp32-d256": [(32, 16, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2)],
}
_BACKWARD_KEY_CONFIGS = {  # owns BLOCK_N keys, steps over BLOCK_M queries
    "d64": [(64, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3)],
    # rotary: every config tried spills (the fp32 rotary tiles of each query block on top of the dK, dV
    # accumulators; bench/compile_check.py, sm_90 bf16, bytes per thread): these spill least, 32 / 60 /
    # 140 at D64 and, below, 520 / 1080 / 1564 at D80 and 328 / 548 / 116 at D128; 4 warps spill more
    "d64-rope": [(32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    "d128": [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2)],
    "d128-rope": [(16, 64, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
    "d256": [(32, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
    "d256-mask": [(32, 32, 8, 2), (16, 32, 4, 2)],
    "fp32": [(32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)],
    "fp32-d128": [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2), (32, 32, 8, 1)],
    "fp32-d256": [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
}
_BACKWARD_QUERY_CONFIGS = {  # owns BLOCK_M queries, steps over BLOCK_N keys
    "d64": [(128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    "d64-masks": [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "d128": [(128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
    "d128-mask": [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 2)],
    # rotary: spills (bytes per thread) 0 / 360 / 192 at D128, 32 / 0 / 0 at D80 (compile_check, sm_90 bf16)
    "d128-rope": [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    "d256": [(32, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    "d256-mask": [(32, 32, 4, 2), (128, 32, 8, 2)],
    "fp32": [(32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
    "fp32-d128": [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    "fp32-d256": [(32, 16, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
}

_BIAS_GRAD_CONFIGS = {  # owns a BLOCK_M x BLOCK_N bias tile, recomputes S and dP there per batch entry
    "d64": [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    "d128": [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    "d256": [(32, 32, 4, 2), (64, 32, 8, 2)],
    "fp32": [(32, 32, 4, 2), (32, 16, 4, 2)],
    "fp32-d128": [(32, 16, 8, 2), (16, 16, 4, 2)],
    "fp32-d256": [(16, 16, 4, 2), (32, 16, 8, 2)],
}
# ---------------------------------------------------------------------------------------------
# Tile helpers


@triton.jit
def _load_tile(base, rows, cols, stride_row, stride_col, num_rows, num_cols, CHECK_COLS: tl.constexpr):
    """A rows x cols tile, zero outside [0, num_rows) x [0, num_cols)."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    in_bounds = rows[:, None] < num_rows
    if CHECK_COLS:
        in_bounds = in_bounds & (cols[None, :] < num_cols)
    return tl.load(ptrs, mask=in_bounds, other=0.0)


@triton.jit
def _store_tile(base, rows, cols, stride_row, stride_col, num_rows, num_cols, tile, CHECK_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    in_bounds = rows[:, None] < num_rows
    if CHECK_COLS:
        in_bounds = in_bounds & (cols[None, :] < num_cols)
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=in_bounds)


@triton.jit
def _load_chunks(base, rows, stride_row, stride_col, num_rows,
                 DIM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """Rows `rows` of a (num_rows, DIM) matrix as its head-dim chunks [0, C0) and [C0, C0 + C1), zero
    outside the matrix. Without a second chunk (C1 == 0) the first stands in for it, unused."""
    chunk0 = _load_tile(base, rows, tl.arange(0, C0), stride_row, stride_col, num_rows, DIM, C0 > DIM)
    chunk1 = chunk0
    if C1 > 0:
        chunk1 = _load_tile(base, rows, C0 + tl.arange(0, C1), stride_row, stride_col, num_rows, DIM, C0 + C1 > DIM)
    return chunk0, chunk1


@triton.jit
def _store_chunks(base, rows, stride_row, stride_col, num_rows, tile0, tile1,
                  DIM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                  ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Writes the head-dim chunks tile0 (columns [0, C0)) and, when C1 > 0, tile1 ([C0, C0 + C1)), in
    the kernels' column order for rotary q and k (ROTARY_DIM 0: memory order)."""
    cols0 = _rotary_columns(tl.arange(0, C0), ROTARY_DIM, INTERLEAVED)
    _store_tile(base, rows, cols0, stride_row, stride_col, num_rows, DIM, tile0, C0 > DIM)
    if C1 > 0:
        cols1 = _rotary_columns(C0 + tl.arange(0, C1), ROTARY_DIM, INTERLEAVED)
        _store_tile(base, rows, cols1, stride_row, stride_col, num_rows, DIM, tile1, C0 + C1 > DIM)


@triton.jit
def _zero_chunks(ROWS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """fp32 accumulators for the two head-dim chunks; the first stands in for an absent second."""
    zeros0 = tl.zeros([ROWS, C0], tl.float32)
    zeros1 = zeros0
    if C1 > 0:
        zeros1 = tl.zeros([ROWS, C1], tl.float32)
    return zeros0, zeros1


# ---------------------------------------------------------------------------------------------
# Rotary embeddings: q and k in the kernels' column order, where rotary pairs are neighbours


@triton.jit
def _rotary_columns(cols, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The memory columns of q and k behind the kernels' columns `cols`. Kernel columns 2i and 2i + 1
    are a rotary pair: memory columns 2i and 2i + 1 (interleaved layout), or i and i + ROTARY_DIM / 2
    (rotate-half layout); columns past ROTARY_DIM stay where they are."""
    if ROTARY_DIM == 0 or INTERLEAVED:
        return cols
    return tl.where(cols < ROTARY_DIM, cols // 2 + (cols % 2) * (ROTARY_DIM // 2), cols)


@triton.jit
def _pairs(tile):
    """(first, second) members of the rotary pairs of a tile: its even and odd kernel columns."""
    return tl.split(tl.reshape(tile, (tile.shape[0], tile.shape[1] // 2, 2)))


@triton.jit
def _joined(first, second):
    """The tile whose even and odd columns are `first` and `second` (the inverse of _pairs)."""
    pairs = tl.join(first, second)
    return tl.reshape(pairs, (pairs.shape[0], pairs.shape[1] * 2))


@triton.jit
def _rotary_tables(Cos, Sin, rows, cols, stride_rot_m, stride_rot_d, num_rows,
                   ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """cos and sin at rows x kernel columns in fp32, each as (first, second) pair members; 1 and 0 past
    ROTARY_DIM and num_rows, where the rotation keeps a column as it is."""
    offsets = rows[:, None] * stride_rot_m + _rotary_columns(cols, ROTARY_DIM, INTERLEAVED)[None, :] * stride_rot_d
    in_table = (rows[:, None] < num_rows) & (cols[None, :] < ROTARY_DIM)
    cos_first, cos_second = _pairs(tl.load(Cos + offsets, mask=in_table, other=1.0).to(tl.float32))
    sin_first, sin_second = _pairs(tl.load(Sin + offsets, mask=in_table, other=0.0).to(tl.float32))
    return cos_first, cos_second, sin_first, sin_second


@triton.jit
def _load_rotated_tile(base, Cos, Sin, rows, cols, stride_row, stride_col, stride_rot_m, stride_rot_d, num_rows,
                       num_cols, CHECK_COLS: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """A rows x cols tile of q or k (kernel columns), rotated by the table rows `rows` in fp32 and
    rounded back to its dtype: (x0 cos0 - x1 sin0, x1 cos1 + x0 sin1) for each pair (x0, x1)."""
    tile = _load_tile(base, rows, _rotary_columns(cols, ROTARY_DIM, INTERLEAVED), stride_row, stride_col, num_rows,
                      num_cols, CHECK_COLS)
    if ROTARY_DIM > 0:
        cos0, cos1, sin0, sin1 = _rotary_tables(Cos, Sin, rows, cols, stride_rot_m, stride_rot_d, num_rows,
                                                ROTARY_DIM, INTERLEAVED)
        x0, x1 = _pairs(tile.to(tl.float32))
        tile = _joined(x0 * cos0 - x1 * sin0, x1 * cos1 + x0 * sin1).to(tile.dtype)
    return tile


@triton.jit
def _load_rotated_chunks(base, Cos, Sin, rows, stride_row, stride_col, stride_rot_m, stride_rot_d, num_rows,
                         DIM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                         ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """_load_chunks for q or k: the chunks rotated (ROTARY_DIM 0: as they are)."""
    chunk0 = _load_rotated_tile(base, Cos, Sin, rows, tl.arange(0, C0), stride_row, stride_col, stride_rot_m,
                                stride_rot_d, num_rows, DIM, C0 > DIM, ROTARY_DIM, INTERLEAVED)
    chunk1 = chunk0
    if C1 > 0:
        chunk1 = _load_rotated_tile(base, Cos, Sin, rows, C0 + tl.arange(0, C1), stride_row, stride_col, stride_rot_m,
                                    stride_rot_d, num_rows, DIM, C0 + C1 > DIM, ROTARY_DIM, INTERLEAVED)
    return chunk0, chunk1


@triton.jit
def _unrotated_tile(grad, Cos, Sin, rows, cols, stride_rot_m, stride_rot_d, num_rows,
                    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The gradient (fp32) of unrotated q or k from that of the rotated one, by the rotation's
    transpose: (g0 cos0 + g1 sin1, g1 cos1 - g0 sin0) for each pair (g0, g1)."""
    cos0, cos1, sin0, sin1 = _rotary_tables(Cos, Sin, rows, cols, stride_rot_m, stride_rot_d, num_rows,
                                            ROTARY_DIM, INTERLEAVED)
    grad0, grad1 = _pairs(grad)
    return _joined(grad0 * cos0 + grad1 * sin1, grad1 * cos1 - grad0 * sin0)


@triton.jit
def _unrotated_chunks(grad0, grad1, Cos, Sin, rows, stride_rot_m, stride_rot_d, num_rows,
                      C0: tl.constexpr, C1: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """_unrotated_tile of both head-dim chunks (ROTARY_DIM 0: as they are)."""
    if ROTARY_DIM > 0:
        grad0 = _unrotated_tile(grad0, Cos, Sin, rows, tl.arange(0, C0), stride_rot_m, stride_rot_d, num_rows,
                                ROTARY_DIM, INTERLEAVED)
        if C1 > 0:
            grad1 = _unrotated_tile(grad1, Cos, Sin, rows, C0 + tl.arange(0, C1), stride_rot_m, stride_rot_d,
                                    num_rows, ROTARY_DIM, INTERLEAVED)
    return grad0, grad1


# ---------------------------------------------------------------------------------------------
# Masks, block ranges and programs


@triton.jit
def _apply_user_mask(scores, mask_base, offs_m, offs_n, stride_mm, stride_mn, seq_q, seq_k,
                     MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Scores (base-2 units) with one user mask applied. The tile is queries x keys, or keys x
    queries when TRANSPOSED. MASK_PER_KEY (query stride 0, as for a key-padding mask) loads one
    vector per key block instead of a full tile."""
    if MASK_KIND != NO_MASK:
        if MASK_PER_KEY:
            ptrs = mask_base + offs_n * stride_mn
            in_bounds = offs_n < seq_k
            if TRANSPOSED:
                ptrs = ptrs[:, None]
                in_bounds = in_bounds[:, None]
            else:
                ptrs = ptrs[None, :]
                in_bounds = in_bounds[None, :]
        elif TRANSPOSED:
            ptrs = mask_base + offs_n[:, None] * stride_mn + offs_m[None, :] * stride_mm
            in_bounds = (offs_n[:, None] < seq_k) & (offs_m[None, :] < seq_q)
        else:
            ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            in_bounds = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
        if MASK_KIND == BOOL_MASK:
            attend = tl.load(ptrs, mask=in_bounds, other=0)
            scores = tl.where(attend != 0, scores, float("-inf"))
        else:
            bias = tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            scores = scores + bias * LOG2E
    return scores


@triton.jit
def _apply_masks(scores, Mask, Bias, offs_m, offs_n, stride_mm, stride_mn, stride_bias_m, stride_bias_n, seq_q, seq_k,
                 MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr,
                 BIAS_PER_KEY: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Scores with the mask (bool or additive) and the additive bias applied, in one pass."""
    scores = _apply_user_mask(scores, Mask, offs_m, offs_n, stride_mm, stride_mn, seq_q, seq_k,
                              MASK_KIND, MASK_PER_KEY, TRANSPOSED)
    return _apply_user_mask(scores, Bias, offs_m, offs_n, stride_bias_m, stride_bias_n, seq_q, seq_k,
                            BIAS_KIND, BIAS_PER_KEY, TRANSPOSED)


@triton.jit
def _key_blocks(MASKED: tl.constexpr, start_m, seq_k,
                IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range [lo, hi) for the query block at start_m: blocks in [0, unmasked_end) need neither the
    causal nor the key-length mask, those in [unmasked_end, end) need them (MASKED); causal blocks
    past end see nothing."""
    end = seq_k
    unmasked_end = (seq_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        end = tl.minimum(seq_k, start_m + BLOCK_M)
        # a key block is fully visible when its last key <= the block's first query
        unmasked_end = tl.minimum(unmasked_end, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    lo = 0
    hi = unmasked_end
    if MASKED:
        lo = unmasked_end
        hi = end
    return lo, hi


@triton.jit
def _query_blocks(MASKED: tl.constexpr, start_n, seq_q,
                  IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range [lo, hi) for the key block at start_n: blocks in [diagonal_end, seq_q) see all of
    it, those in [first_visible, diagonal_end) cross its causal diagonal (MASKED); causal blocks before
    first_visible see none of it."""
    first_visible = 0
    diagonal_end = 0
    if IS_CAUSAL:
        first_visible = (start_n // BLOCK_M) * BLOCK_M
        diagonal_end = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, seq_q)
    lo = diagonal_end
    hi = seq_q
    if MASKED:
        lo = first_visible
        hi = diagonal_end
    return lo, hi


@triton.jit
def _keys_visible(offs_m, offs_n, seq_k, IS_CAUSAL: tl.constexpr):
    visible = offs_n[None, :] < seq_k
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return visible


@triton.jit
def _program_block(num_blocks, REVERSE: tl.constexpr):
    """(flat batch index, block) of this program; the grid is flat so the batch has no 65535 limit."""
    pid = tl.program_id(0)
    bh = pid // num_blocks
    block = pid % num_blocks
    if REVERSE:  # causal: the longest query rows first, so short programs fill the tail
        block = num_blocks - 1 - block
    return bh, block


@triton.jit
def _batch_index(bh, batch1, batch2):
    """(i0, i1, i2) of the flat batch index bh = (i0 * batch1 + i1) * batch2 + i2, as int64 so that
    offsets past 2**31 elements are exact."""
    bh = tl.cast(bh, tl.int64)
    return bh // (batch1 * batch2), (bh // batch2) % batch1, bh % batch2


@triton.jit
def _at_batch(base, i0, i1, i2, stride0, stride1, stride2):
    return base + i0 * stride0 + i1 * stride1 + i2 * stride2


@triton.jit
def _sequence(CuSeqlens, index, length, VARLEN: tl.constexpr):
    """(first row, length) of batch entry `index`'s rows: with VARLEN sequence `index` of a packed
    batch, rows cu_seqlens[index] to cu_seqlens[index + 1]; else rows 0 to `length` of its own entry."""
    first = 0
    if VARLEN:
        first = tl.load(CuSeqlens + index).to(tl.int64)
        length = (tl.load(CuSeqlens + index + 1) - first).to(tl.int32)
    return first, length


@triton.jit
def _row_statistics(Lse, Delta, offs_m, seq_q):
    """lse (base 2) and delta of query rows offs_m. Rows past seq_q get lse = +inf, so that their
    probabilities are 0 without a length mask."""
    in_range = offs_m < seq_q
    lse = tl.load(Lse + offs_m, mask=in_range, other=float("inf")) * LOG2E
    delta = tl.load(Delta + offs_m, mask=in_range, other=0.0)
    return lse, delta


@triton.jit
def _softmax_backward(scores, grad_p, lse, delta):
    """P = exp2(S - lse) and dS = P * (dP - delta), lse and delta broadcast along the tile's key axis."""
    p = tl.exp2(scores - lse)
    return p, p * (grad_p - delta)


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_key_block(
    acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, Bias, CosK, SinK, offs_m, start_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
    stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The online-softmax update of (acc0, acc1, m_i, l_i) with keys [start_n, start_n + BLOCK_N);
    MASKED applies the key-length and causal masks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0, k1 = _load_rotated_chunks(K, CosK, SinK, offs_n, stride_kn, stride_kd, stride_rot_m, stride_rot_d, seq_k,
                                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if D1 > 0:
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    s = _apply_masks(s * qk_scale, Mask, Bias, offs_m, offs_n, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
                     seq_q, seq_k, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, False)
    if MASKED:
        s = tl.where(_keys_visible(offs_m, offs_n, seq_k, IS_CAUSAL), s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if MASK_KIND != NO_MASK or BIAS_KIND != NO_MASK:
        # a row that has seen only masked keys so far: shift by 0, not -inf (-inf - -inf = NaN)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    v0 = _load_tile(V, offs_n, tl.arange(0, DV0), stride_vn, stride_vd, seq_k, HEAD_DIM_V, DV0 > HEAD_DIM_V)
    acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if DV1 > 0:
        v1 = _load_tile(V, offs_n, DV0 + tl.arange(0, DV1), stride_vn, stride_vd, seq_k, HEAD_DIM_V,
                        DV0 + DV1 > HEAD_DIM_V)
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _forward_query_rows(
    Q, K, V, Mask, Bias, CosQ, SinQ, CosK, SinK, Out, Lse, start_m,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_om, stride_od, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):
    """Out and lse of query rows [start_m, start_m + ROWS) of one batch entry."""
    offs_m = start_m + tl.arange(0, ROWS)
    q0, q1 = _load_rotated_chunks(Q, CosQ, SinQ, offs_m, stride_qm, stride_qd, stride_rot_m, stride_rot_d, seq_q,
                                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)

    # Running row max (base-2 scores), row sum of exp2(score - max), unnormalised output.
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc0, acc1 = _zero_chunks(ROWS, DV0, DV1)

    lo, hi = _key_blocks(False, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        acc0, acc1, m_i, l_i = _forward_key_block(
            acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, Bias, CosK, SinK, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
            stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION,
            False, BLOCK_N)
    # the causal diagonal in whole blocks; without it only the partial last block is left: tail steps
    MASKED_STEP: tl.constexpr = BLOCK_N if IS_CAUSAL else TAIL_N
    lo, hi = _key_blocks(True, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, MASKED_STEP):
        acc0, acc1, m_i, l_i = _forward_key_block(
            acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, Bias, CosK, SinK, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
            stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION,
            True, MASKED_STEP)

    attended = l_i > 0.0  # False only for rows whose every key is masked
    l_safe = tl.where(attended, l_i, 1.0)
    inv_l = tl.where(attended, 1.0 / l_safe, 0.0)
    lse = tl.where(attended, (m_i + tl.log2(l_safe)) / LOG2E, float("inf"))
    tl.store(Lse + offs_m, lse, mask=offs_m < seq_q)
    _store_chunks(Out, offs_m, stride_om, stride_od, seq_q, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                  HEAD_DIM_V, DV0, DV1, 0, False)


@_autotuned((32, 32), _FORWARD_CONFIGS)
@triton.jit
def _attention_forward_kernel(
    Q, K, V, Mask, Bias, Cos, Sin, Out, Lse,
    stride_q0, stride_q1, stride_q2, stride_qm, stride_qd,
    stride_k0, stride_k1, stride_k2, stride_kn, stride_kd,
    stride_v0, stride_v1, stride_v2, stride_vn, stride_vd,
    stride_m0, stride_m1, stride_m2, stride_mm, stride_mn,
    stride_bias0, stride_bias1, stride_bias2, stride_bias_m, stride_bias_n,
    stride_rot0, stride_rot1, stride_rot2, stride_rot_m, stride_rot_d,
    stride_o0, stride_o1, stride_o2, stride_om, stride_od,
    stride_lse0, stride_lse1, stride_lse2, CuSeqlensQ, CuSeqlensK,
    batch1, batch2, kv_group, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, VARLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """Out and lse of one block of BLOCK_M query rows (TAIL_M for a last block that fits one) of one
    batch entry; with VARLEN, of one sequence (seq_q and seq_k are then the longest ones), a block
    past the sequence's end doing nothing."""
    bh, m_block = _program_block(tl.cdiv(seq_q, BLOCK_M), IS_CAUSAL)
    i0, i1, i2 = _batch_index(bh, batch1, batch2)
    q_first, seq_q = _sequence(CuSeqlensQ, i1, seq_q, VARLEN)
    k_first, seq_k = _sequence(CuSeqlensK, i1, seq_k, VARLEN)
    start_m = m_block * BLOCK_M
    if start_m < seq_q:
        Q = _at_batch(Q, i0, i1, i2, stride_q0, stride_q1, stride_q2) + q_first * stride_qm
        K = _at_batch(K, i0, i1, i2 // kv_group, stride_k0, stride_k1, stride_k2) + k_first * stride_kn
        V = _at_batch(V, i0, i1, i2 // kv_group, stride_v0, stride_v1, stride_v2) + k_first * stride_vn
        Mask = _at_batch(Mask, i0, i1, i2, stride_m0, stride_m1, stride_m2)
        Bias = _at_batch(Bias, i0, i1, i2, stride_bias0, stride_bias1, stride_bias2)
        rot_q = _at_batch(q_first * stride_rot_m, i0, i1, i2, stride_rot0, stride_rot1, stride_rot2)
        rot_k = rot_q + (k_first - q_first) * stride_rot_m
        Out = _at_batch(Out, i0, i1, i2, stride_o0, stride_o1, stride_o2) + q_first * stride_om
        Lse = _at_batch(Lse, i0, i1, i2, stride_lse0, stride_lse1, stride_lse2) + q_first
        if seq_q - start_m <= TAIL_M:  # the last block, and its rows fit a tail-sized tile
            _forward_query_rows(
                Q, K, V, Mask, Bias, Cos + rot_q, Sin + rot_q, Cos + rot_k, Sin + rot_k, Out, Lse, start_m,
                stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_om, stride_od, seq_q, seq_k, qk_scale,
                HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY,
                ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION, TAIL_M, BLOCK_N, TAIL_N)
        else:
            _forward_query_rows(
                Q, K, V, Mask, Bias, Cos + rot_q, Sin + rot_q, Cos + rot_k, Sin + rot_k, Out, Lse, start_m,
                stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_om, stride_od, seq_q, seq_k, qk_scale,
                HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY,
                ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N, TAIL_N)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_backward_delta_kernel(
    Out, GradOut, Delta,
    stride_o0, stride_o1, stride_o2, stride_om, stride_od,
    stride_g0, stride_g1, stride_g2, stride_gm, stride_gd,
    batch1, batch2, seq_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax gradient."""
    bh, m_block = _program_block(tl.cdiv(seq_q, BLOCK_M), False)
    i0, i1, i2 = _batch_index(bh, batch1, batch2)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    out = _load_tile(_at_batch(Out, i0, i1, i2, stride_o0, stride_o1, stride_o2), offs_m, offs_d,
                     stride_om, stride_od, seq_q, HEAD_DIM_V, BLOCK_DV > HEAD_DIM_V)
    grad_out = _load_tile(_at_batch(GradOut, i0, i1, i2, stride_g0, stride_g1, stride_g2), offs_m, offs_d,
                          stride_gm, stride_gd, seq_q, HEAD_DIM_V, BLOCK_DV > HEAD_DIM_V)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _key_grads_query_block(
    grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, Bias, CosQ, SinQ, offs_n, start_m,
    stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
    stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK (of the rotated keys) and dV of the key block offs_n, accumulated over queries
    [start_m, start_m + BLOCK_M); MASKED applies the causal mask. Rows past seq_q need no mask: their
    lse is +inf."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lse, delta = _row_statistics(Lse, Delta, offs_m, seq_q)
    q0, q1 = _load_rotated_chunks(Q, CosQ, SinQ, offs_m, stride_qm, stride_qd, stride_rot_m, stride_rot_d, seq_q,
                                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    grad_out0, grad_out1 = _load_chunks(GradOut, offs_m, stride_gm, stride_gd, seq_q, HEAD_DIM_V, DV0, DV1)
    s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
    grad_p_t = tl.dot(v0, tl.trans(grad_out0), input_precision=DOT_PRECISION)
    if D1 > 0:
        s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PRECISION)
    if DV1 > 0:
        grad_p_t = tl.dot(v1, tl.trans(grad_out1), grad_p_t, input_precision=DOT_PRECISION)
    s_t = _apply_masks(s_t * qk_scale, Mask, Bias, offs_m, offs_n, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
                       seq_q, seq_k, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, True)
    if MASKED:
        s_t = tl.where(offs_n[:, None] <= offs_m[None, :], s_t, float("-inf"))
    p_t, grad_s_t = _softmax_backward(s_t, grad_p_t, lse[None, :], delta[None, :])

    grad_v0 = tl.dot(p_t.to(grad_out0.dtype), grad_out0, grad_v0, input_precision=DOT_PRECISION)
    grad_k0 = tl.dot(grad_s_t.to(q0.dtype), q0, grad_k0, input_precision=DOT_PRECISION)
    if DV1 > 0:
        grad_v1 = tl.dot(p_t.to(grad_out1.dtype), grad_out1, grad_v1, input_precision=DOT_PRECISION)
    if D1 > 0:
        grad_k1 = tl.dot(grad_s_t.to(q1.dtype), q1, grad_k1, input_precision=DOT_PRECISION)
    return grad_k0, grad_k1, grad_v0, grad_v1


@triton.jit
def _key_grads_one_head(
    grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, Bias, CosQ, SinQ, offs_n,
    start_n, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
    stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
):
    """dK and dV of keys offs_n accumulated over every query block of one query head: whole blocks, the
    partial last block in tail steps, then the blocks on the causal diagonal."""
    lo, hi = _query_blocks(False, start_n, seq_q, IS_CAUSAL, BLOCK_M, COLS)
    whole_end = lo + (hi - lo) // BLOCK_M * BLOCK_M
    for start_m in range(lo, whole_end, BLOCK_M):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_query_block(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, Bias, CosQ, SinQ,
            offs_n, start_m, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, stride_bias_m,
            stride_bias_n, stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, DOT_PRECISION, False,
            BLOCK_M)
    for start_m in range(whole_end, hi, TAIL_M):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_query_block(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, Bias, CosQ, SinQ,
            offs_n, start_m, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, stride_bias_m,
            stride_bias_n, stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, DOT_PRECISION, False,
            TAIL_M)
    lo, hi = _query_blocks(True, start_n, seq_q, IS_CAUSAL, BLOCK_M, COLS)
    for start_m in range(lo, hi, BLOCK_M):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_query_block(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, Bias, CosQ, SinQ,
            offs_n, start_m, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, stride_bias_m,
            stride_bias_n, stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, DOT_PRECISION, True,
            BLOCK_M)
    return grad_k0, grad_k1, grad_v0, grad_v1


@triton.jit
def _key_grad_columns(
    Q, K, V, Mask, Bias, CosQ, SinQ, CosK, SinK, GradOut, Lse, Delta, GradK, GradV, start_n, kv_group,
    stride_q2, stride_m2, stride_bias2, stride_rot2, stride_g2, stride_lse2,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_gm, stride_gd, stride_dkn, stride_dkd,
    stride_dvn, stride_dvd, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
):
    """dK and dV of keys [start_n, start_n + COLS) of one key/value head, summed over the kv_group
    query heads that share it, in head order (Q, GradOut, Lse, ... point at the first). The keys'
    rotation is one for the group (per-head tables come with as many key heads as query heads), so
    dK is rotated back once, after the sum."""
    offs_n = start_n + tl.arange(0, COLS)
    k0, k1 = _load_rotated_chunks(K, CosK, SinK, offs_n, stride_kn, stride_kd, stride_rot_m, stride_rot_d, seq_k,
                                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    v0, v1 = _load_chunks(V, offs_n, stride_vn, stride_vd, seq_k, HEAD_DIM_V, DV0, DV1)
    grad_k0, grad_k1 = _zero_chunks(COLS, D0, D1)
    grad_v0, grad_v1 = _zero_chunks(COLS, DV0, DV1)
    for _ in range(kv_group):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_one_head(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, Bias, CosQ, SinQ,
            offs_n, start_n, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, stride_bias_m,
            stride_bias_n, stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0,
            DV1, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL,
            DOT_PRECISION, COLS, BLOCK_M, TAIL_M)
        Q += stride_q2
        GradOut += stride_g2
        Lse += stride_lse2
        Delta += stride_lse2
        Mask += stride_m2
        Bias += stride_bias2
        CosQ += stride_rot2
        SinQ += stride_rot2

    grad_k0, grad_k1 = _unrotated_chunks(grad_k0, grad_k1, CosK, SinK, offs_n, stride_rot_m, stride_rot_d, seq_k,
                                         D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    _store_chunks(GradV, offs_n, stride_dvn, stride_dvd, seq_k, grad_v0, grad_v1, HEAD_DIM_V, DV0, DV1, 0, False)
    _store_chunks(GradK, offs_n, stride_dkn, stride_dkd, seq_k, grad_k0 * sm_scale, grad_k1 * sm_scale,
                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)


@_autotuned((32, 32), _BACKWARD_KEY_CONFIGS)
@triton.jit
def _attention_backward_key_kernel(
    Q, K, V, Mask, Bias, Cos, Sin, GradOut, Lse, Delta, GradK, GradV,
    stride_q0, stride_q1, stride_q2, stride_qm, stride_qd,
    stride_k0, stride_k1, stride_k2, stride_kn, stride_kd,
    stride_v0, stride_v1, stride_v2, stride_vn, stride_vd,
    stride_m0, stride_m1, stride_m2, stride_mm, stride_mn,
    stride_bias0, stride_bias1, stride_bias2, stride_bias_m, stride_bias_n,
    stride_rot0, stride_rot1, stride_rot2, stride_rot_m, stride_rot_d,
    stride_g0, stride_g1, stride_g2, stride_gm, stride_gd,
    stride_dk0, stride_dk1, stride_dk2, stride_dkn, stride_dkd,
    stride_dv0, stride_dv1, stride_dv2, stride_dvn, stride_dvd,
    stride_lse0, stride_lse1, stride_lse2, CuSeqlensQ, CuSeqlensK,
    batch1, batch2, kv_group, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, VARLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dK and dV for one block of BLOCK_N keys (TAIL_N for a last block that fits one) of one key/value
    head, looping over the query heads that share it and their query blocks. Works on transposed (keys
    x queries) score tiles so that dV = P^T dO and dK = dS^T Q need no transposes of P, dS."""
    bh, n_block = _program_block(tl.cdiv(seq_k, BLOCK_N), False)
    i0, i1, kv_head = _batch_index(bh, batch1, batch2 // kv_group)
    q_first, seq_q = _sequence(CuSeqlensQ, i1, seq_q, VARLEN)
    k_first, seq_k = _sequence(CuSeqlensK, i1, seq_k, VARLEN)
    start_n = n_block * BLOCK_N
    if start_n < seq_k:
        i2 = kv_head * kv_group  # the first query head of the group
        Q = _at_batch(Q, i0, i1, i2, stride_q0, stride_q1, stride_q2) + q_first * stride_qm
        K = _at_batch(K, i0, i1, kv_head, stride_k0, stride_k1, stride_k2) + k_first * stride_kn
        V = _at_batch(V, i0, i1, kv_head, stride_v0, stride_v1, stride_v2) + k_first * stride_vn
        Mask = _at_batch(Mask, i0, i1, i2, stride_m0, stride_m1, stride_m2)
        Bias = _at_batch(Bias, i0, i1, i2, stride_bias0, stride_bias1, stride_bias2)
        rot_q = _at_batch(q_first * stride_rot_m, i0, i1, i2, stride_rot0, stride_rot1, stride_rot2)
        rot_k = rot_q + (k_first - q_first) * stride_rot_m
        GradOut = _at_batch(GradOut, i0, i1, i2, stride_g0, stride_g1, stride_g2) + q_first * stride_gm
        GradK = _at_batch(GradK, i0, i1, kv_head, stride_dk0, stride_dk1, stride_dk2) + k_first * stride_dkn
        GradV = _at_batch(GradV, i0, i1, kv_head, stride_dv0, stride_dv1, stride_dv2) + k_first * stride_dvn
        rows = _at_batch(q_first, i0, i1, i2, stride_lse0, stride_lse1, stride_lse2)
        if seq_k - start_n <= TAIL_N:
            _key_grad_columns(
                Q, K, V, Mask, Bias, Cos + rot_q, Sin + rot_q, Cos + rot_k, Sin + rot_k, GradOut, Lse + rows,
                Delta + rows, GradK, GradV, start_n, kv_group, stride_q2, stride_m2, stride_bias2, stride_rot2,
                stride_g2, stride_lse2, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                stride_mn, stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_gm, stride_gd, stride_dkn,
                stride_dkd, stride_dvn, stride_dvd, seq_q, seq_k, qk_scale, sm_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0,
                DV1, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL,
                DOT_PRECISION, TAIL_N, BLOCK_M, TAIL_M)
        else:
            _key_grad_columns(
                Q, K, V, Mask, Bias, Cos + rot_q, Sin + rot_q, Cos + rot_k, Sin + rot_k, GradOut, Lse + rows,
                Delta + rows, GradK, GradV, start_n, kv_group, stride_q2, stride_m2, stride_bias2, stride_rot2,
                stride_g2, stride_lse2, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                stride_mn, stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_gm, stride_gd, stride_dkn,
                stride_dkd, stride_dvn, stride_dvd, seq_q, seq_k, qk_scale, sm_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0,
                DV1, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL,
                DOT_PRECISION, BLOCK_N, BLOCK_M, TAIL_M)


@triton.jit
def _score_grads(
    q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, Bias, CosK, SinK, offs_m, offs_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
    stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """dS = P * (dP - delta) of query rows offs_m against keys offs_n (the gradient of the natural
    logits, so also of an additive bias), with the (rotated) key tiles it loaded. MASKED applies the
    key-length and causal masks (keys past seq_k must be masked: their zero-filled scores could
    overflow exp2(s - lse))."""
    k0, k1 = _load_rotated_chunks(K, CosK, SinK, offs_n, stride_kn, stride_kd, stride_rot_m, stride_rot_d, seq_k,
                                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    v0 = _load_tile(V, offs_n, tl.arange(0, DV0), stride_vn, stride_vd, seq_k, HEAD_DIM_V, DV0 > HEAD_DIM_V)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    grad_p = tl.dot(grad_out0, tl.trans(v0), input_precision=DOT_PRECISION)
    if D1 > 0:
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    if DV1 > 0:
        v1 = _load_tile(V, offs_n, DV0 + tl.arange(0, DV1), stride_vn, stride_vd, seq_k, HEAD_DIM_V,
                        DV0 + DV1 > HEAD_DIM_V)
        grad_p = tl.dot(grad_out1, tl.trans(v1), grad_p, input_precision=DOT_PRECISION)
    s = _apply_masks(s * qk_scale, Mask, Bias, offs_m, offs_n, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
                     seq_q, seq_k, MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, False)
    if MASKED:
        s = tl.where(_keys_visible(offs_m, offs_n, seq_k, IS_CAUSAL), s, float("-inf"))
    _, grad_s = _softmax_backward(s, grad_p, lse[:, None], delta[:, None])
    return grad_s, k0, k1


@triton.jit
def _query_grad_key_block(
    grad_q0, grad_q1, q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, Bias, CosK, SinK, offs_m, start_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
    stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ (of the rotated queries) of the query block offs_m, accumulated over keys [start_n, start_n + BLOCK_N)."""
    grad_s, k0, k1 = _score_grads(
        q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, Bias, CosK, SinK, offs_m, start_n + tl.arange(0, BLOCK_N),
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
        stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
        MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION,
        MASKED)
    grad_q0 = tl.dot(grad_s.to(k0.dtype), k0, grad_q0, input_precision=DOT_PRECISION)
    if D1 > 0:
        grad_q1 = tl.dot(grad_s.to(k1.dtype), k1, grad_q1, input_precision=DOT_PRECISION)
    return grad_q0, grad_q1


@triton.jit
def _query_grad_rows(
    Q, K, V, Mask, Bias, CosQ, SinQ, CosK, SinK, GradOut, Lse, Delta, GradQ, start_m,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_gm, stride_gd, stride_dqm, stride_dqd,
    seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ of query rows [start_m, start_m + ROWS) of one batch entry, looping over keys as the forward
    does, rotated back with the queries' tables before it is written."""
    offs_m = start_m + tl.arange(0, ROWS)
    lse, delta = _row_statistics(Lse, Delta, offs_m, seq_q)
    q0, q1 = _load_rotated_chunks(Q, CosQ, SinQ, offs_m, stride_qm, stride_qd, stride_rot_m, stride_rot_d, seq_q,
                                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    grad_out0, grad_out1 = _load_chunks(GradOut, offs_m, stride_gm, stride_gd, seq_q, HEAD_DIM_V, DV0, DV1)
    grad_q0, grad_q1 = _zero_chunks(ROWS, D0, D1)

    lo, hi = _key_blocks(False, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        grad_q0, grad_q1 = _query_grad_key_block(
            grad_q0, grad_q1, q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, Bias, CosK, SinK, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
            stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION,
            False, BLOCK_N)
    # as in the forward: the causal diagonal in whole blocks, else the partial last block in tail steps
    MASKED_STEP: tl.constexpr = BLOCK_N if IS_CAUSAL else TAIL_N
    lo, hi = _key_blocks(True, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, MASKED_STEP):
        grad_q0, grad_q1 = _query_grad_key_block(
            grad_q0, grad_q1, q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, Bias, CosK, SinK, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
            stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL, DOT_PRECISION,
            True, MASKED_STEP)

    grad_q0, grad_q1 = _unrotated_chunks(grad_q0, grad_q1, CosQ, SinQ, offs_m, stride_rot_m, stride_rot_d, seq_q,
                                         D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
    _store_chunks(GradQ, offs_m, stride_dqm, stride_dqd, seq_q, grad_q0 * sm_scale, grad_q1 * sm_scale,
                  HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)


@_autotuned((32, 32), _BACKWARD_QUERY_CONFIGS)
@triton.jit
def _attention_backward_query_kernel(
    Q, K, V, Mask, Bias, Cos, Sin, GradOut, Lse, Delta, GradQ,
    stride_q0, stride_q1, stride_q2, stride_qm, stride_qd,
    stride_k0, stride_k1, stride_k2, stride_kn, stride_kd,
    stride_v0, stride_v1, stride_v2, stride_vn, stride_vd,
    stride_m0, stride_m1, stride_m2, stride_mm, stride_mn,
    stride_bias0, stride_bias1, stride_bias2, stride_bias_m, stride_bias_n,
    stride_rot0, stride_rot1, stride_rot2, stride_rot_m, stride_rot_d,
    stride_g0, stride_g1, stride_g2, stride_gm, stride_gd,
    stride_dq0, stride_dq1, stride_dq2, stride_dqm, stride_dqd,
    stride_lse0, stride_lse1, stride_lse2, CuSeqlensQ, CuSeqlensK,
    batch1, batch2, kv_group, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, VARLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries (TAIL_M for a last block that fits one)."""
    bh, m_block = _program_block(tl.cdiv(seq_q, BLOCK_M), IS_CAUSAL)
    i0, i1, i2 = _batch_index(bh, batch1, batch2)
    q_first, seq_q = _sequence(CuSeqlensQ, i1, seq_q, VARLEN)
    k_first, seq_k = _sequence(CuSeqlensK, i1, seq_k, VARLEN)
    start_m = m_block * BLOCK_M
    if start_m < seq_q:
        Q = _at_batch(Q, i0, i1, i2, stride_q0, stride_q1, stride_q2) + q_first * stride_qm
        K = _at_batch(K, i0, i1, i2 // kv_group, stride_k0, stride_k1, stride_k2) + k_first * stride_kn
        V = _at_batch(V, i0, i1, i2 // kv_group, stride_v0, stride_v1, stride_v2) + k_first * stride_vn
        Mask = _at_batch(Mask, i0, i1, i2, stride_m0, stride_m1, stride_m2)
        Bias = _at_batch(Bias, i0, i1, i2, stride_bias0, stride_bias1, stride_bias2)
        rot_q = _at_batch(q_first * stride_rot_m, i0, i1, i2, stride_rot0, stride_rot1, stride_rot2)
        rot_k = rot_q + (k_first - q_first) * stride_rot_m
        GradOut = _at_batch(GradOut, i0, i1, i2, stride_g0, stride_g1, stride_g2) + q_first * stride_gm
        GradQ = _at_batch(GradQ, i0, i1, i2, stride_dq0, stride_dq1, stride_dq2) + q_first * stride_dqm
        rows = _at_batch(q_first, i0, i1, i2, stride_lse0, stride_lse1, stride_lse2)
        if seq_q - start_m <= TAIL_M:
            _query_grad_rows(
                Q, K, V, Mask, Bias, Cos + rot_q, Sin + rot_q, Cos + rot_k, Sin + rot_k, GradOut, Lse + rows,
                Delta + rows, GradQ, start_m, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_mm, stride_mn, stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_gm, stride_gd,
                stride_dqm, stride_dqd, seq_q, seq_k, qk_scale, sm_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
                MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL,
                DOT_PRECISION, TAIL_M, BLOCK_N, TAIL_N)
        else:
            _query_grad_rows(
                Q, K, V, Mask, Bias, Cos + rot_q, Sin + rot_q, Cos + rot_k, Sin + rot_k, GradOut, Lse + rows,
                Delta + rows, GradQ, start_m, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_mm, stride_mn, stride_bias_m, stride_bias_n, stride_rot_m, stride_rot_d, stride_gm, stride_gd,
                stride_dqm, stride_dqd, seq_q, seq_k, qk_scale, sm_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
                MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL,
                DOT_PRECISION, BLOCK_M, BLOCK_N, TAIL_N)


@_autotuned((32, 32), _BIAS_GRAD_CONFIGS, extra_key=("REDUCE_ROWS", "REDUCE_COLS"))
@triton.jit
def _attention_bias_grad_kernel(
    Q, K, V, Mask, Bias, Cos, Sin, GradOut, Lse, Delta, GradBias,
    stride_q0, stride_q1, stride_q2, stride_qm, stride_qd,
    stride_k0, stride_k1, stride_k2, stride_kn, stride_kd,
    stride_v0, stride_v1, stride_v2, stride_vn, stride_vd,
    stride_m0, stride_m1, stride_m2, stride_mm, stride_mn,
    stride_bias0, stride_bias1, stride_bias2, stride_bias_m, stride_bias_n,
    stride_rot0, stride_rot1, stride_rot2, stride_rot_m, stride_rot_d,
    stride_g0, stride_g1, stride_g2, stride_gm, stride_gd,
    batch1, batch2, seq_q, seq_k, qk_scale,
    kept0, kept1, kept2, reduced1, reduced2, num_entries, chunk_size,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
    ROTARY_DIM: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, REDUCE_ROWS: tl.constexpr, REDUCE_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """One chunk's partial sum of dS over one BLOCK_M x BLOCK_N tile of the bias.

    The bias has kept0 x kept1 x kept2 batch entries (each kept_l is the batch size B_l or 1); every
    one stands for reduced_l = B_l / kept_l entries of each level, num_entries in all, enumerated
    e = (r0 * reduced1 + r1) * reduced2 + r2. A program owns bias entry g, one tile (all query rows when
    the bias has one row, REDUCE_ROWS; all keys when it has one column, REDUCE_COLS) and the entries
    [chunk * chunk_size, (chunk + 1) * chunk_size), which it adds in increasing e, and row and column
    blocks in increasing order, before summing a reduced axis of the tile. It writes
    GradBias[chunk, g, rows, cols], a contiguous float32 (chunks, kept0 * kept1 * kept2, bias rows,
    bias cols) buffer."""
    tiles_n = 1
    if not REDUCE_COLS:
        tiles_n = tl.cdiv(seq_k, BLOCK_N)
    tiles_m = 1
    if not REDUCE_ROWS:
        tiles_m = tl.cdiv(seq_q, BLOCK_M)
    groups = kept0 * kept1 * kept2
    pid = tl.program_id(0)
    tile_n = pid % tiles_n
    tile_m = (pid // tiles_n) % tiles_m
    g = (pid // (tiles_n * tiles_m)) % groups
    chunk = pid // (tiles_n * tiles_m * groups)
    g0, g1, g2 = _batch_index(g, kept1, kept2)

    m_lo = tile_m * BLOCK_M
    m_hi = m_lo + 1  # one block
    if REDUCE_ROWS:
        m_hi = seq_q
    n_lo = tile_n * BLOCK_N
    n_hi = n_lo + 1
    if REDUCE_COLS:
        n_hi = seq_k
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for e in range(chunk * chunk_size, tl.minimum(chunk * chunk_size + chunk_size, num_entries)):
        r0, r1, r2 = _batch_index(e, reduced1, reduced2)
        # one of g_l, r_l is 0 on every level: kept_l == 1 or reduced_l == 1
        i0, i1, i2 = g0 + r0, g1 + r1, g2 + r2
        bh = (i0 * batch1 + i1) * batch2 + i2
        q_entry = _at_batch(Q, i0, i1, i2, stride_q0, stride_q1, stride_q2)
        k_entry = _at_batch(K, i0, i1, i2, stride_k0, stride_k1, stride_k2)
        v_entry = _at_batch(V, i0, i1, i2, stride_v0, stride_v1, stride_v2)
        mask_entry = _at_batch(Mask, i0, i1, i2, stride_m0, stride_m1, stride_m2)
        bias_entry = _at_batch(Bias, i0, i1, i2, stride_bias0, stride_bias1, stride_bias2)
        rot = _at_batch(0, i0, i1, i2, stride_rot0, stride_rot1, stride_rot2)  # Lq == Lk: one table for q and k
        grad_out_entry = _at_batch(GradOut, i0, i1, i2, stride_g0, stride_g1, stride_g2)
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            lse, delta = _row_statistics(Lse + bh * seq_q, Delta + bh * seq_q, offs_m, seq_q)
            q0, q1 = _load_rotated_chunks(q_entry, Cos + rot, Sin + rot, offs_m, stride_qm, stride_qd, stride_rot_m,
                                          stride_rot_d, seq_q, HEAD_DIM, D0, D1, ROTARY_DIM, ROTARY_INTERLEAVED)
            grad_out0, grad_out1 = _load_chunks(grad_out_entry, offs_m, stride_gm, stride_gd, seq_q, HEAD_DIM_V, DV0, DV1)
            for start_n in range(n_lo, n_hi, BLOCK_N):
                grad_s, _, _ = _score_grads(
                    q0, q1, grad_out0, grad_out1, lse, delta, k_entry, v_entry, mask_entry, bias_entry, Cos + rot,
                    Sin + rot, offs_m, start_n + tl.arange(0, BLOCK_N),
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_bias_m, stride_bias_n,
                    stride_rot_m, stride_rot_d, seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
                    MASK_KIND, MASK_PER_KEY, BIAS_KIND, BIAS_PER_KEY, ROTARY_DIM, ROTARY_INTERLEAVED, IS_CAUSAL,
                    DOT_PRECISION, True)
                acc += grad_s

    bias_rows = seq_q
    if REDUCE_ROWS:
        bias_rows = 1
    bias_cols = seq_k
    if REDUCE_COLS:
        bias_cols = 1
    GradBias += tl.cast(chunk * groups + g, tl.int64) * bias_rows * bias_cols
    rows = m_lo + tl.arange(0, BLOCK_M)
    cols = n_lo + tl.arange(0, BLOCK_N)
    if REDUCE_ROWS and REDUCE_COLS:
        tl.store(GradBias, tl.sum(tl.sum(acc, 1), 0))
    elif REDUCE_ROWS:
        tl.store(GradBias + cols, tl.sum(acc, 0), mask=cols < seq_k)
    elif REDUCE_COLS:
        tl.store(GradBias + rows, tl.sum(acc, 1), mask=rows < seq_q)
    else:
        _store_tile(GradBias, rows, cols, bias_cols, 1, seq_q, seq_k, acc, True)


# ---------------------------------------------------------------------------------------------
# Launchers


def _five_dims(tensor):
    """A tensor with leading size-1 dims up to 5 (a (B, H, L, X) one as (1, B, H, L, X)); None stays None."""
    return tensor if tensor is None else tensor.view((1,) * (5 - tensor.dim()) + tuple(tensor.shape))


def _packed(tensor, sequences):
    """A packed (total, H, X) tensor as the kernels' (1, sequences, H, total, X) view: stride 0 over
    the sequences, whose rows the kernels find in cu_seqlens. Rotary tables (total, X) get H = 1."""
    if tensor is None:
        return None
    if tensor.dim() == 2:
        tensor = tensor[:, None]
    heads_first = tensor.transpose(0, 1)
    return heads_first[None, None].expand(1, sequences, *heads_first.shape)


def _packed_rows(rows, sequences):
    """A packed (H, total) lse or delta as the kernels' (1, sequences, H, total) view."""
    return rows[None, None].expand(1, sequences, *rows.shape)


def _additive_arguments(tensor, kind_name, batch, seq_q, seq_k, query):
    """(tensor, 5 strides, {KIND, PER_KEY}) of a mask or bias broadcast to (*batch, seq_q, seq_k)
    through stride-0 views; a dummy pointer, zero strides and NO_MASK when absent."""
    if tensor is None:
        return query, (0,) * 5, {f"{kind_name}_KIND": NO_MASK.value, f"{kind_name}_PER_KEY": False}
    tensor = tensor.expand(*batch, seq_q, seq_k)
    flags = {f"{kind_name}_PER_KEY": tensor.stride(3) == 0}  # every query row reads the same keys
    if tensor.dtype == torch.bool:
        return tensor.view(torch.uint8), tensor.stride(), {f"{kind_name}_KIND": BOOL_MASK.value, **flags}
    return tensor, tensor.stride(), {f"{kind_name}_KIND": ADDITIVE_MASK.value, **flags}


def _rotary_arguments(cos, sin, batch, query):
    """(cos, sin, their 5 strides, ROTARY_DIM) of rotary tables broadcast to (*batch, rows, R) through
    stride-0 views; dummy pointers, zero strides and 0 when absent."""
    if cos is None:
        return query, query, (0,) * 5, 0
    if cos.stride() != sin.stride():  # the kernels read both through one set of strides; tables are small
        cos, sin = cos.contiguous(), sin.contiguous()
    cos, sin = (t.expand(*batch, *t.shape[-2:]) for t in (cos, sin))
    return cos, sin, cos.stride(), cos.shape[-1]


def _launch_arguments(query, key, value, mask, bias, cos, sin, rotary_interleaved, is_causal, scale, lengths):
    """The pointers-and-strides prefix and the keyword arguments every attention kernel takes, from
    5-D query (B0, B1, B2, ., D), key and value (B0, B1, B2 / kv_group, ., .), mask, bias and rotary
    tables broadcastable to (B0, B1, B2, ., .); ``lengths`` = (seq_q, seq_k), the longest when packed."""
    batch, head_dim, head_dim_v = query.shape[:3], query.shape[4], value.shape[4]
    assert key.shape[:2] == value.shape[:2] == batch[:2] and batch[2] % key.shape[2] == 0
    mask, mask_strides, mask_flags = _additive_arguments(mask, "MASK", batch, *lengths, query)
    bias, bias_strides, bias_flags = _additive_arguments(bias, "BIAS", batch, *lengths, query)
    assert bias_flags["BIAS_KIND"] != BOOL_MASK.value, "the bias is additive"
    cos, sin, rotary_strides, rotary_dim = _rotary_arguments(cos, sin, batch, query)
    assert key.shape[2] == batch[2] or rotary_strides[2] == 0, "per-head rotary tables need a key head per query head"
    d0, d1 = _head_dim_chunks(head_dim)
    dv0, dv1 = _head_dim_chunks(head_dim_v)
    tensors = (query, key, value, mask, bias, cos, sin)
    strides = (*query.stride(), *key.stride(), *value.stride(), *mask_strides, *bias_strides, *rotary_strides)
    options = dict(
        batch1=batch[1], batch2=batch[2], seq_q=lengths[0], seq_k=lengths[1], qk_scale=scale * LOG2E.value,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, D0=d0, D1=d1, DV0=dv0, DV1=dv1, **mask_flags, **bias_flags,
        ROTARY_DIM=rotary_dim, ROTARY_INTERLEAVED=bool(rotary_interleaved), IS_CAUSAL=bool(is_causal),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return tensors, strides, options


def _packing_arguments(query, key, lse, packed):
    """What the forward, dK/dV and dQ kernels take beyond _launch_arguments: lse's (and delta's) batch
    strides, the key/value head group, and cu_seqlens when ``packed`` = (cu_seqlens_q, cu_seqlens_k)."""
    cu_seqlens = (query, query) if packed is None else packed
    return dict(stride_lse0=lse.stride(0), stride_lse1=lse.stride(1), stride_lse2=lse.stride(2),
                CuSeqlensQ=cu_seqlens[0], CuSeqlensK=cu_seqlens[1], kv_group=query.shape[2] // key.shape[2],
                VARLEN=packed is not None)


def _forward(query, key, value, mask, bias, cos, sin, rotary_interleaved, out, lse, is_causal, scale, lengths,
             packed=None):
    """The forward kernel over 5-D views (out like query; lse (B0, B1, B2, rows))."""
    tensors, strides, options = _launch_arguments(query, key, value, mask, bias, cos, sin, rotary_interleaved,
                                                  is_causal, scale, lengths)
    entries = query.shape[0] * query.shape[1] * query.shape[2]
    grid = lambda meta: (triton.cdiv(lengths[0], meta["BLOCK_M"]) * entries,)  # noqa: E731
    _attention_forward_kernel[grid](*tensors, out, lse, *strides, *out.stride(),
                                    **_packing_arguments(query, key, lse, packed), **options)


def attention_forward(query, key, value, mask, bias, is_causal: bool, scale: float, rotary_cos=None, rotary_sin=None,
                      rotary_interleaved: bool = False):
    """(out, lse float32 natural log, +inf for fully masked rows): out shaped (..., Lq, Dv) in query's
    dtype, laid out (..., Lq, H, Dv) (``empty_attention_output``). Inputs 4-D or 5-D; see the module
    docstring for shapes, masks, rotary tables and causal alignment."""
    out = empty_attention_output(query, value.shape[-1])
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    if lse.numel() == 0:
        return out, lse
    query, key, value, mask, bias, cos, sin, out5 = (_five_dims(t) for t in (query, key, value, mask, bias, rotary_cos,
                                                                             rotary_sin, out))
    _forward(query, key, value, mask, bias, cos, sin, rotary_interleaved, out5, lse.view(query.shape[:4]), is_causal,
             scale, (query.shape[3], key.shape[3]))
    return out, lse


def varlen_attention_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                             is_causal: bool, scale: float, rotary_cos=None, rotary_sin=None,
                             rotary_interleaved: bool = False):
    """Attention within each sequence of a packed batch: query (total_q, Hq, D), key and value
    (total_k, Hkv, .), sequence b in rows cu_seqlens[b] to cu_seqlens[b + 1] (int32, checked by the
    caller; max_seqlen at least every sequence's length); rotary tables (total_q, R), or (total_q, Hq,
    R) when Hq == Hkv. Returns (out (total_q, Hq, Dv) in query's dtype, lse (Hq, total_q) float32),
    contiguous."""
    total_q, heads = query.shape[:2]
    out = query.new_empty((total_q, heads, value.shape[-1]))
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=query.device)
    sequences = cu_seqlens_q.numel() - 1
    if total_q == 0:
        return out, lse
    views = (_packed(t, sequences) for t in (query, key, value, rotary_cos, rotary_sin, out))
    query5, key5, value5, cos, sin, out5 = views
    _forward(query5, key5, value5, None, None, cos, sin, rotary_interleaved, out5, _packed_rows(lse, sequences),
             is_causal, scale, (max_seqlen_q, max_seqlen_k), (cu_seqlens_q, cu_seqlens_k))
    return out, lse


def _row_deltas(out, grad_out, delta):
    """delta = rowsum(dO * O) of 5-D out and grad_out (B0, B1, B2, rows, Dv) into a contiguous
    (B0 * B1 * B2, rows) float32 ``delta``."""
    rows, block_dv = out.shape[3], triton.next_power_of_2(out.shape[4])
    # two (rows x head dim) fp32 tiles in registers: fewer rows for wide heads (d256 spilled at 64)
    delta_block = 16 if INTERPRETED else max(16, min(64, 8192 // block_dv))
    _attention_backward_delta_kernel[(triton.cdiv(rows, delta_block) * out.shape[0] * out.shape[1] * out.shape[2],)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), out.shape[1], out.shape[2], rows,
        HEAD_DIM_V=out.shape[4], BLOCK_DV=block_dv, BLOCK_M=delta_block,
    )


def _backward(grad_out, query, key, value, lse, delta, mask, bias, cos, sin, rotary_interleaved, grad_query, grad_key,
              grad_value, is_causal, scale, lengths, packed=None):
    """The dK/dV and dQ kernels over 5-D views (grads like their inputs; lse and delta (B0, B1, B2,
    rows)); returns the (inputs, strides, options) the bias-gradient kernel takes."""
    tensors, strides, options = _launch_arguments(query, key, value, mask, bias, cos, sin, rotary_interleaved,
                                                  is_causal, scale, lengths)
    inputs = (*tensors, grad_out, lse, delta)
    input_strides = (*strides, *grad_out.stride())
    packing = _packing_arguments(query, key, lse, packed)
    entries = query.shape[0] * query.shape[1] * query.shape[2]
    if lengths[1] > 0:
        key_grid = lambda meta: (triton.cdiv(lengths[1], meta["BLOCK_N"]) * entries // packing["kv_group"],)  # noqa: E731
        _attention_backward_key_kernel[key_grid](
            *inputs, grad_key, grad_value, *input_strides, *grad_key.stride(), *grad_value.stride(),
            sm_scale=scale, **packing, **options,
        )
    if lengths[0] > 0:
        query_grid = lambda meta: (triton.cdiv(lengths[0], meta["BLOCK_M"]) * entries,)  # noqa: E731
        _attention_backward_query_kernel[query_grid](
            *inputs, grad_query, *input_strides, *grad_query.stride(), sm_scale=scale, **packing, **options,
        )
    return inputs, input_strides, options


def attention_backward(grad_out, query, key, value, out, lse, mask, bias, is_causal: bool, scale: float,
                       bias_requires_grad: bool, rotary_cos=None, rotary_sin=None, rotary_interleaved: bool = False):
    """(grad_query, grad_key, grad_value, grad_bias) shaped and typed as their inputs, from the
    forward's ``out`` and ``lse``; grad_bias is None unless ``bias_requires_grad``, and summed over
    the batch entries, rows and columns the bias broadcasts over."""
    grad_query = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    grad_key = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    grad_value = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    grad_bias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if bias_requires_grad else None
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    if query.shape[:-2].numel() == 0 or (seq_q == 0 and seq_k == 0):
        return grad_query, grad_key, grad_value, grad_bias
    views = (_five_dims(t) for t in (grad_out, query, key, value, out, mask, bias, rotary_cos, rotary_sin, grad_query,
                                     grad_key, grad_value))
    grad_out, query, key, value, out, mask, bias, cos, sin, grad_query5, grad_key5, grad_value5 = views
    lse = lse.contiguous().view(query.shape[:4])
    delta = torch.empty(lse.shape, dtype=torch.float32, device=query.device)
    if seq_q > 0:
        _row_deltas(out, grad_out, delta)
    inputs, input_strides, options = _backward(grad_out, query, key, value, lse, delta, mask, bias, cos, sin,
                                               rotary_interleaved, grad_query5, grad_key5, grad_value5, is_causal,
                                               scale, (seq_q, seq_k))
    if bias_requires_grad and seq_q > 0 and seq_k > 0:
        grad_bias = _bias_grad(inputs, input_strides, options, bias.shape).to(bias.dtype).view(grad_bias.shape)
    return grad_query, grad_key, grad_value, grad_bias


def varlen_attention_backward(grad_out, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, is_causal: bool, scale: float, rotary_cos=None, rotary_sin=None,
                              rotary_interleaved: bool = False):
    """(grad_query, grad_key, grad_value) of varlen_attention_forward, contiguous, typed as their inputs."""
    grad_query, grad_key, grad_value = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (query, key, value))
    sequences = cu_seqlens_q.numel() - 1
    delta = torch.empty(lse.shape, dtype=torch.float32, device=query.device)
    if query.shape[0] > 0:
        _row_deltas(*(_packed(t, 1) for t in (out, grad_out)), delta)
    lse_rows, delta_rows = (_packed_rows(t, sequences) for t in (lse.contiguous(), delta))
    views = (_packed(t, sequences) for t in (grad_out, query, key, value, rotary_cos, rotary_sin, grad_query, grad_key,
                                             grad_value))
    grad_out5, query5, key5, value5, cos, sin, grad_query5, grad_key5, grad_value5 = views
    lengths = (max_seqlen_q if query.shape[0] else 0, max_seqlen_k if key.shape[0] else 0)
    _backward(grad_out5, query5, key5, value5, lse_rows, delta_rows, None, None, cos, sin, rotary_interleaved,
              grad_query5, grad_key5, grad_value5, is_causal, scale, lengths, (cu_seqlens_q, cu_seqlens_k))
    return grad_query, grad_key, grad_value


# Programs the bias gradient aims for: a few per SM of an H100/H200 (132 SMs).
BIAS_GRAD_PROGRAMS = 1024


def bias_grad_chunks(num_entries: int, bias_tiles: int) -> tuple[int, int]:
    """(chunk_size, chunks): the batch entries a bias element sums over, split into consecutive
    chunks summed separately and then added in chunk order. Depends on shapes only (bias_tiles counts
    the bias's 64 x 64 tiles), so every config, device and run sums in the same order."""
    chunks = max(1, min(num_entries, BIAS_GRAD_PROGRAMS // max(1, bias_tiles)))
    chunk_size = triton.cdiv(num_entries, chunks)
    return chunk_size, triton.cdiv(num_entries, chunk_size)


def _bias_grad(inputs, input_strides, options, bias_shape):
    """dS summed over what the 5-D ``bias_shape`` broadcasts over, in float32."""
    batch = (inputs[0].shape[0], options["batch1"], options["batch2"])
    seq_q, seq_k = options["seq_q"], options["seq_k"]
    kept = bias_shape[:3]
    reduced = tuple(size // k for size, k in zip(batch, kept))
    rows, cols = bias_shape[3], bias_shape[4]
    groups = kept[0] * kept[1] * kept[2]
    num_entries = reduced[0] * reduced[1] * reduced[2]
    chunk_size, chunks = bias_grad_chunks(num_entries, groups * triton.cdiv(rows, 64) * triton.cdiv(cols, 64))
    partial = torch.empty((chunks, groups, rows, cols), dtype=torch.float32, device=inputs[0].device)
    reduce_rows, reduce_cols = rows == 1 and seq_q > 1, cols == 1 and seq_k > 1

    def grid(meta):
        tiles_m = 1 if reduce_rows else triton.cdiv(seq_q, meta["BLOCK_M"])
        tiles_n = 1 if reduce_cols else triton.cdiv(seq_k, meta["BLOCK_N"])
        return (chunks * groups * tiles_m * tiles_n,)

    _attention_bias_grad_kernel[grid](
        *inputs, partial, *input_strides, kept0=kept[0], kept1=kept[1], kept2=kept[2], reduced1=reduced[1],
        reduced2=reduced[2], num_entries=num_entries, chunk_size=chunk_size, REDUCE_ROWS=reduce_rows,
        REDUCE_COLS=reduce_cols, **options,
    )
    return partial[0] if chunks == 1 else partial.sum(0)
