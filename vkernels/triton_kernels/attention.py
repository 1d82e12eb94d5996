"""Flash attention in Triton: a forward with online softmax and a deterministic three-kernel backward.

Shapes: query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv), read through any strides.
``mask`` is None or a (B, H, Lq, Lk) view (stride 0 on broadcast dimensions), bool (True = attend)
or additive float. ``is_causal`` is top-left aligned as in torch SDPA: query i attends key j iff
j <= i, whatever Lq and Lk are.

lse convention: ``lse[b, h, i]`` is the natural-log log-sum-exp over keys of the scaled, masked
logits ``scale * q_i . k_j + mask_ij`` (torch's ``logsumexp``), in float32. A row whose every key is
masked gets out = 0 and lse = +inf, so that exp(s - lse) = 0 and the backward gives it zero
gradients. Internally the kernels work in base 2 (scores carry a factor log2(e), softmax uses exp2).

Tiling follows FlashAttention-2: a forward program owns BLOCK_M query rows and streams key blocks;
the backward computes delta = rowsum(dO * O), then one kernel owns a key block and loops over query
blocks for dK, dV, and another owns a query block and loops over key blocks for dQ. Every output
element is written by one program in a fixed order: no atomics, bitwise deterministic. Sequences
rarely fill their last block (ViT lengths: 50, 197, 257, 577): the loops cross it in quarter-block
steps and the program owning it takes a quarter-size tile when the rest fits one (_tiled_config).
Those small tiles run on mma.sync (wgmma needs 64 rows), and each kernel compiles both tile sizes.

Head dims are split into at most two power-of-two chunks (80 = 64 + 16, 40 = 32 + 16) that are
loaded and multiplied separately, so 80 costs 80 (not 128) columns of matmul work.
"""
import torch
import triton
import triton.language as tl

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
    # a full (query x key) mask tile costs registers: smaller key tiles
    full_mask = args["MASK_KIND"] != NO_MASK.value and not args["MASK_PER_KEY"]
    return f"{name}-mask" if full_mask else name


def _tiled_config(block_m: int, block_n: int, **options) -> triton.Config:
    """A config of BLOCK_M query x BLOCK_N key tiles, with the tail sizes TAIL_M and TAIL_N: a quarter
    block, at least 16 (tl.dot's smallest extent). A kernel's loop crosses the streamed sequence's
    last, partial block in tail steps, and the program that owns a sequence's last block takes a
    tail-sized tile when the rest fits in one, so that e.g. 257 queries x 257 keys in 128-blocks cost
    288 x 288 of work instead of 384 x 384, and 50 keys 64 columns instead of 128."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "TAIL_M": max(16, block_m // 4),
                          "TAIL_N": max(16, block_n // 4)}, **options)


def _autotuned(interpreted: tuple[int, int], table: dict[str, list[tuple[int, int, int, int]]]):
    if INTERPRETED:
        return autotune([_tiled_config(*interpreted)], key=[])
    by_class = {
        name: [_tiled_config(m, n, num_warps=w, num_stages=s) for m, n, w, s in rows]
        for name, rows in table.items()
    }

    def configs_for_class(configs, args):
        name = _config_class(args)
        return by_class.get(name, by_class[name.removesuffix("-mask")])

    return autotune(
        [config for rows in by_class.values() for config in rows],
        key=["seq_q", "seq_k", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "MASK_PER_KEY", "IS_CAUSAL"],
        sizes=("seq_q", "seq_k"),
        prune=configs_for_class,
    )


_FORWARD_CONFIGS = {
    "d64": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
    "d64-mask": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2)],
    "d128": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3)],
    "d128-mask": [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2)],
    "d256": [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    "d256-mask": [(64, 32, 8, 2), (32, 32, 4, 2)],
    "fp32": [(32, 32, 4, 2), (32, 64, 8, 2), (32, 16, 4, 2), (32, 32, 8, 2)],
    # wider fp32 heads: 32-key tiles spill kilobytes per thread (bench/compile_check.py), 16-key ones none
    "fp32-d128": [(32, 16, 8, 2), (16, 16, 4, 2), (32, 32, 8, 1), (16, 32, 8, 1)],
    "fp32-d256": [(32, 16, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2)],
}
_BACKWARD_KEY_CONFIGS = {  # owns BLOCK_N keys, steps over BLOCK_M queries
    "d64": [(64, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3)],
    "d128": [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2)],
    "d256": [(32, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
    "d256-mask": [(32, 32, 8, 2), (16, 32, 4, 2)],
    "fp32": [(32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)],
    "fp32-d128": [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2), (32, 32, 8, 1)],
    "fp32-d256": [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
}
_BACKWARD_QUERY_CONFIGS = {  # owns BLOCK_M queries, steps over BLOCK_N keys
    "d64": [(128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    "d128": [(128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
    "d128-mask": [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 2)],
    "d256": [(32, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    "d256-mask": [(32, 32, 4, 2), (128, 32, 8, 2)],
    "fp32": [(32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
    "fp32-d128": [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    "fp32-d256": [(32, 16, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
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
                  DIM: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """Writes the head-dim chunks tile0 (columns [0, C0)) and, when C1 > 0, tile1 ([C0, C0 + C1))."""
    _store_tile(base, rows, tl.arange(0, C0), stride_row, stride_col, num_rows, DIM, tile0, C0 > DIM)
    if C1 > 0:
        _store_tile(base, rows, C0 + tl.arange(0, C1), stride_row, stride_col, num_rows, DIM, tile1, C0 + C1 > DIM)


@triton.jit
def _zero_chunks(ROWS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """fp32 accumulators for the two head-dim chunks; the first stands in for an absent second."""
    zeros0 = tl.zeros([ROWS, C0], tl.float32)
    zeros1 = zeros0
    if C1 > 0:
        zeros1 = tl.zeros([ROWS, C1], tl.float32)
    return zeros0, zeros1


@triton.jit
def _apply_user_mask(scores, mask_base, offs_m, offs_n, stride_mm, stride_mn, seq_q, seq_k,
                     MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Scores (base-2 units) with the user's mask applied. The tile is queries x keys, or keys x
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
    """(batch*head, block) of this program; the grid is flat so batch*heads has no 65535 limit."""
    pid = tl.program_id(0)
    bh = pid // num_blocks
    block = pid % num_blocks
    if REVERSE:  # causal: the longest query rows first, so short programs fill the tail
        block = num_blocks - 1 - block
    return bh, block


@triton.jit
def _head_inputs(Q, K, V, Mask, bh, num_heads,
                 stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb, stride_mh):
    """Batch b and head h of the flat index bh, as int64 so that offsets past 2**31 elements are exact,
    and Q, K, V, Mask moved to that head."""
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Mask += b * stride_mb + h * stride_mh
    return b, h, Q, K, V, Mask


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
    acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, offs_m, start_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The online-softmax update of (acc0, acc1, m_i, l_i) with keys [start_n, start_n + BLOCK_N);
    MASKED applies the key-length and causal masks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_tile(K, offs_n, tl.arange(0, D0), stride_kn, stride_kd, seq_k, HEAD_DIM, D0 > HEAD_DIM)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if D1 > 0:
        k1 = _load_tile(K, offs_n, D0 + tl.arange(0, D1), stride_kn, stride_kd, seq_k, HEAD_DIM, D0 + D1 > HEAD_DIM)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    s = _apply_user_mask(s * qk_scale, Mask, offs_m, offs_n, stride_mm, stride_mn, seq_q, seq_k,
                         MASK_KIND, MASK_PER_KEY, False)
    if MASKED:
        s = tl.where(_keys_visible(offs_m, offs_n, seq_k, IS_CAUSAL), s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if MASK_KIND != NO_MASK:
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
    Q, K, V, Mask, Out, Lse, start_m,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_om, stride_od,
    seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):
    """Out and lse of query rows [start_m, start_m + ROWS) of one head."""
    offs_m = start_m + tl.arange(0, ROWS)
    q0, q1 = _load_chunks(Q, offs_m, stride_qm, stride_qd, seq_q, HEAD_DIM, D0, D1)

    # Running row max (base-2 scores), row sum of exp2(score - max), unnormalised output.
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc0, acc1 = _zero_chunks(ROWS, DV0, DV1)

    lo, hi = _key_blocks(False, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        acc0, acc1, m_i, l_i = _forward_key_block(
            acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            False, BLOCK_N)
    # the causal diagonal in whole blocks; without it only the partial last block is left: tail steps
    MASKED_STEP: tl.constexpr = BLOCK_N if IS_CAUSAL else TAIL_N
    lo, hi = _key_blocks(True, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, MASKED_STEP):
        acc0, acc1, m_i, l_i = _forward_key_block(
            acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            True, MASKED_STEP)

    attended = l_i > 0.0  # False only for rows whose every key is masked
    l_safe = tl.where(attended, l_i, 1.0)
    inv_l = tl.where(attended, 1.0 / l_safe, 0.0)
    lse = tl.where(attended, (m_i + tl.log2(l_safe)) / LOG2E, float("inf"))
    tl.store(Lse + offs_m, lse, mask=offs_m < seq_q)
    _store_chunks(Out, offs_m, stride_om, stride_od, seq_q, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                  HEAD_DIM_V, DV0, DV1)


@_autotuned((32, 32), _FORWARD_CONFIGS)
@triton.jit
def _attention_forward_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    bh, m_block = _program_block(tl.cdiv(seq_q, BLOCK_M), IS_CAUSAL)
    b, h, Q, K, V, Mask = _head_inputs(Q, K, V, Mask, bh, num_heads, stride_qb, stride_qh, stride_kb, stride_kh,
                                       stride_vb, stride_vh, stride_mb, stride_mh)
    Out += b * stride_ob + h * stride_oh
    Lse += bh.to(tl.int64) * seq_q
    start_m = m_block * BLOCK_M
    if seq_q - start_m <= TAIL_M:  # the last block, and its rows fit a tail-sized tile
        _forward_query_rows(
            Q, K, V, Mask, Out, Lse, start_m,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_om, stride_od,
            seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION, TAIL_M, BLOCK_N, TAIL_N)
    else:
        _forward_query_rows(
            Q, K, V, Mask, Out, Lse, start_m,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_om, stride_od,
            seq_q, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1,
            MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N, TAIL_N)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_backward_delta_kernel(
    Out, GradOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    num_heads, seq_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax gradient."""
    bh, m_block = _program_block(tl.cdiv(seq_q, BLOCK_M), False)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    out = _load_tile(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, seq_q,
                     HEAD_DIM_V, BLOCK_DV > HEAD_DIM_V)
    grad_out = _load_tile(GradOut + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gm, stride_gd, seq_q,
                          HEAD_DIM_V, BLOCK_DV > HEAD_DIM_V)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _key_grads_query_block(
    grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, offs_n, start_m,
    stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK and dV of the key block offs_n, accumulated over queries [start_m, start_m + BLOCK_M);
    MASKED applies the causal mask. Rows past seq_q need no mask: their lse is +inf."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lse, delta = _row_statistics(Lse, Delta, offs_m, seq_q)
    q0 = _load_tile(Q, offs_m, tl.arange(0, D0), stride_qm, stride_qd, seq_q, HEAD_DIM, D0 > HEAD_DIM)
    grad_out0 = _load_tile(GradOut, offs_m, tl.arange(0, DV0), stride_gm, stride_gd, seq_q, HEAD_DIM_V,
                           DV0 > HEAD_DIM_V)
    s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
    grad_p_t = tl.dot(v0, tl.trans(grad_out0), input_precision=DOT_PRECISION)
    if D1 > 0:
        q1 = _load_tile(Q, offs_m, D0 + tl.arange(0, D1), stride_qm, stride_qd, seq_q, HEAD_DIM, D0 + D1 > HEAD_DIM)
        s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PRECISION)
    if DV1 > 0:
        grad_out1 = _load_tile(GradOut, offs_m, DV0 + tl.arange(0, DV1), stride_gm, stride_gd, seq_q,
                               HEAD_DIM_V, DV0 + DV1 > HEAD_DIM_V)
        grad_p_t = tl.dot(v1, tl.trans(grad_out1), grad_p_t, input_precision=DOT_PRECISION)
    s_t = _apply_user_mask(s_t * qk_scale, Mask, offs_m, offs_n, stride_mm, stride_mn, seq_q, seq_k,
                           MASK_KIND, MASK_PER_KEY, True)
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
def _key_grad_columns(
    Q, K, V, Mask, GradOut, Lse, Delta, GradK, GradV, start_n,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_gm, stride_gd,
    stride_dkn, stride_dkd, stride_dvn, stride_dvd, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
):
    """dK and dV of keys [start_n, start_n + COLS) of one head."""
    offs_n = start_n + tl.arange(0, COLS)
    k0, k1 = _load_chunks(K, offs_n, stride_kn, stride_kd, seq_k, HEAD_DIM, D0, D1)
    v0, v1 = _load_chunks(V, offs_n, stride_vn, stride_vd, seq_k, HEAD_DIM_V, DV0, DV1)
    grad_k0, grad_k1 = _zero_chunks(COLS, D0, D1)
    grad_v0, grad_v1 = _zero_chunks(COLS, DV0, DV1)

    # whole query blocks, the partial last block in tail steps, then the blocks on the causal diagonal
    lo, hi = _query_blocks(False, start_n, seq_q, IS_CAUSAL, BLOCK_M, COLS)
    whole_end = lo + (hi - lo) // BLOCK_M * BLOCK_M
    for start_m in range(lo, whole_end, BLOCK_M):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_query_block(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, offs_n, start_m,
            stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, DOT_PRECISION, False, BLOCK_M)
    for start_m in range(whole_end, hi, TAIL_M):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_query_block(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, offs_n, start_m,
            stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, DOT_PRECISION, False, TAIL_M)
    lo, hi = _query_blocks(True, start_n, seq_q, IS_CAUSAL, BLOCK_M, COLS)
    for start_m in range(lo, hi, BLOCK_M):
        grad_k0, grad_k1, grad_v0, grad_v1 = _key_grads_query_block(
            grad_k0, grad_k1, grad_v0, grad_v1, k0, k1, v0, v1, Q, GradOut, Lse, Delta, Mask, offs_n, start_m,
            stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, DOT_PRECISION, True, BLOCK_M)

    _store_chunks(GradV, offs_n, stride_dvn, stride_dvd, seq_k, grad_v0, grad_v1, HEAD_DIM_V, DV0, DV1)
    _store_chunks(GradK, offs_n, stride_dkn, stride_dkd, seq_k, grad_k0 * sm_scale, grad_k1 * sm_scale,
                  HEAD_DIM, D0, D1)


@_autotuned((32, 32), _BACKWARD_KEY_CONFIGS)
@triton.jit
def _attention_backward_key_kernel(
    Q, K, V, Mask, GradOut, Lse, Delta, GradK, GradV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dK and dV for one block of BLOCK_N keys (TAIL_N for a last block that fits one), looping over
    query blocks. Works on transposed (keys x queries) score tiles so that dV = P^T dO and
    dK = dS^T Q need no transposes of P, dS."""
    bh, n_block = _program_block(tl.cdiv(seq_k, BLOCK_N), False)
    b, h, Q, K, V, Mask = _head_inputs(Q, K, V, Mask, bh, num_heads, stride_qb, stride_qh, stride_kb, stride_kh,
                                       stride_vb, stride_vh, stride_mb, stride_mh)
    GradOut += b * stride_gb + h * stride_gh
    GradK += b * stride_dkb + h * stride_dkh
    GradV += b * stride_dvb + h * stride_dvh
    Lse += bh.to(tl.int64) * seq_q
    Delta += bh.to(tl.int64) * seq_q
    start_n = n_block * BLOCK_N
    if seq_k - start_n <= TAIL_N:
        _key_grad_columns(
            Q, K, V, Mask, GradOut, Lse, Delta, GradK, GradV, start_n,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_gm, stride_gd,
            stride_dkn, stride_dkd, stride_dvn, stride_dvd, seq_q, seq_k, qk_scale, sm_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            TAIL_N, BLOCK_M, TAIL_M)
    else:
        _key_grad_columns(
            Q, K, V, Mask, GradOut, Lse, Delta, GradK, GradV, start_n,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_gm, stride_gd,
            stride_dkn, stride_dkd, stride_dvn, stride_dvd, seq_q, seq_k, qk_scale, sm_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            BLOCK_N, BLOCK_M, TAIL_M)


@triton.jit
def _query_grad_key_block(
    grad_q0, grad_q1, q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, offs_m, start_n,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of the query block offs_m, accumulated over keys [start_n, start_n + BLOCK_N); MASKED
    applies the key-length and causal masks (keys past seq_k must be masked here: their zero-filled
    scores could overflow exp2(s - lse))."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_tile(K, offs_n, tl.arange(0, D0), stride_kn, stride_kd, seq_k, HEAD_DIM, D0 > HEAD_DIM)
    v0 = _load_tile(V, offs_n, tl.arange(0, DV0), stride_vn, stride_vd, seq_k, HEAD_DIM_V, DV0 > HEAD_DIM_V)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    grad_p = tl.dot(grad_out0, tl.trans(v0), input_precision=DOT_PRECISION)
    if D1 > 0:
        k1 = _load_tile(K, offs_n, D0 + tl.arange(0, D1), stride_kn, stride_kd, seq_k, HEAD_DIM, D0 + D1 > HEAD_DIM)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    if DV1 > 0:
        v1 = _load_tile(V, offs_n, DV0 + tl.arange(0, DV1), stride_vn, stride_vd, seq_k, HEAD_DIM_V,
                        DV0 + DV1 > HEAD_DIM_V)
        grad_p = tl.dot(grad_out1, tl.trans(v1), grad_p, input_precision=DOT_PRECISION)
    s = _apply_user_mask(s * qk_scale, Mask, offs_m, offs_n, stride_mm, stride_mn, seq_q, seq_k,
                         MASK_KIND, MASK_PER_KEY, False)
    if MASKED:
        s = tl.where(_keys_visible(offs_m, offs_n, seq_k, IS_CAUSAL), s, float("-inf"))
    _, grad_s = _softmax_backward(s, grad_p, lse[:, None], delta[:, None])
    grad_q0 = tl.dot(grad_s.to(k0.dtype), k0, grad_q0, input_precision=DOT_PRECISION)
    if D1 > 0:
        grad_q1 = tl.dot(grad_s.to(k1.dtype), k1, grad_q1, input_precision=DOT_PRECISION)
    return grad_q0, grad_q1


@triton.jit
def _query_grad_rows(
    Q, K, V, Mask, GradOut, Lse, Delta, GradQ, start_m,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_gm, stride_gd,
    stride_dqm, stride_dqd, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ of query rows [start_m, start_m + ROWS) of one head, looping over keys as the forward does."""
    offs_m = start_m + tl.arange(0, ROWS)
    lse, delta = _row_statistics(Lse, Delta, offs_m, seq_q)
    q0, q1 = _load_chunks(Q, offs_m, stride_qm, stride_qd, seq_q, HEAD_DIM, D0, D1)
    grad_out0, grad_out1 = _load_chunks(GradOut, offs_m, stride_gm, stride_gd, seq_q, HEAD_DIM_V, DV0, DV1)
    grad_q0, grad_q1 = _zero_chunks(ROWS, D0, D1)

    lo, hi = _key_blocks(False, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        grad_q0, grad_q1 = _query_grad_key_block(
            grad_q0, grad_q1, q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            False, BLOCK_N)
    # as in the forward: the causal diagonal in whole blocks, else the partial last block in tail steps
    MASKED_STEP: tl.constexpr = BLOCK_N if IS_CAUSAL else TAIL_N
    lo, hi = _key_blocks(True, start_m, seq_k, IS_CAUSAL, ROWS, BLOCK_N)
    for start_n in range(lo, hi, MASKED_STEP):
        grad_q0, grad_q1 = _query_grad_key_block(
            grad_q0, grad_q1, q0, q1, grad_out0, grad_out1, lse, delta, K, V, Mask, offs_m, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, seq_q, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            True, MASKED_STEP)

    _store_chunks(GradQ, offs_m, stride_dqm, stride_dqd, seq_q, grad_q0 * sm_scale, grad_q1 * sm_scale,
                  HEAD_DIM, D0, D1)


@_autotuned((32, 32), _BACKWARD_QUERY_CONFIGS)
@triton.jit
def _attention_backward_query_kernel(
    Q, K, V, Mask, GradOut, Lse, Delta, GradQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, seq_q, seq_k, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries (TAIL_M for a last block that fits one)."""
    bh, m_block = _program_block(tl.cdiv(seq_q, BLOCK_M), IS_CAUSAL)
    b, h, Q, K, V, Mask = _head_inputs(Q, K, V, Mask, bh, num_heads, stride_qb, stride_qh, stride_kb, stride_kh,
                                       stride_vb, stride_vh, stride_mb, stride_mh)
    GradOut += b * stride_gb + h * stride_gh
    GradQ += b * stride_dqb + h * stride_dqh
    Lse += bh.to(tl.int64) * seq_q
    Delta += bh.to(tl.int64) * seq_q
    start_m = m_block * BLOCK_M
    if seq_q - start_m <= TAIL_M:
        _query_grad_rows(
            Q, K, V, Mask, GradOut, Lse, Delta, GradQ, start_m,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_gm, stride_gd,
            stride_dqm, stride_dqd, seq_q, seq_k, qk_scale, sm_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            TAIL_M, BLOCK_N, TAIL_N)
    else:
        _query_grad_rows(
            Q, K, V, Mask, GradOut, Lse, Delta, GradQ, start_m,
            stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_gm, stride_gd,
            stride_dqm, stride_dqd, seq_q, seq_k, qk_scale, sm_scale,
            HEAD_DIM, HEAD_DIM_V, D0, D1, DV0, DV1, MASK_KIND, MASK_PER_KEY, IS_CAUSAL, DOT_PRECISION,
            BLOCK_M, BLOCK_N, TAIL_N)


# ---------------------------------------------------------------------------------------------
# Launchers


def _mask_arguments(mask, query):
    """(tensor, 4 strides, constexprs) for the kernels; a dummy pointer and zero strides when absent."""
    if mask is None:
        return query, (0, 0, 0, 0), dict(MASK_KIND=NO_MASK.value, MASK_PER_KEY=False)
    per_key = dict(MASK_PER_KEY=mask.stride(2) == 0 or mask.shape[2] == 1)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), dict(MASK_KIND=BOOL_MASK.value, **per_key)
    return mask, mask.stride(), dict(MASK_KIND=ADDITIVE_MASK.value, **per_key)


def _shape_arguments(query, key, value, mask, is_causal, scale):
    batch, heads, seq_q, head_dim = query.shape
    seq_k, head_dim_v = key.shape[2], value.shape[3]
    assert key.shape == (batch, heads, seq_k, head_dim) and value.shape == (batch, heads, seq_k, head_dim_v)
    assert mask is None or mask.shape == (batch, heads, seq_q, seq_k)
    d0, d1 = _head_dim_chunks(head_dim)
    dv0, dv1 = _head_dim_chunks(head_dim_v)
    return dict(
        num_heads=heads, seq_q=seq_q, seq_k=seq_k, qk_scale=scale * LOG2E.value,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, D0=d0, D1=d1, DV0=dv0, DV1=dv1,
        IS_CAUSAL=bool(is_causal), DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )


def attention_forward(query, key, value, mask, is_causal: bool, scale: float):
    """(out (B, H, Lq, Dv) in query's dtype, lse (B, H, Lq) float32, natural log, +inf for fully
    masked rows). See the module docstring for shapes, masks and causal alignment."""
    batch, heads, seq_q, _ = query.shape
    out = torch.empty((batch, heads, seq_q, value.shape[3]), dtype=query.dtype, device=query.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=query.device)
    if lse.numel() == 0:
        return out, lse
    shape = _shape_arguments(query, key, value, mask, is_causal, scale)
    mask_tensor, mask_strides, mask_flags = _mask_arguments(mask, query)
    grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attention_forward_kernel[grid](
        query, key, value, mask_tensor, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *out.stride(),
        **mask_flags, **shape,
    )
    return out, lse


def attention_backward(grad_out, query, key, value, out, lse, mask, is_causal: bool, scale: float):
    """(grad_query, grad_key, grad_value) shaped and typed as their inputs, from the forward's
    ``out`` and ``lse``. The additive mask gets no gradient."""
    batch, heads, seq_q, _ = query.shape
    seq_k = key.shape[2]
    grad_query = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    grad_key = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    grad_value = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if batch * heads == 0 or (seq_q == 0 and seq_k == 0):
        return grad_query, grad_key, grad_value
    shape = _shape_arguments(query, key, value, mask, is_causal, scale)
    mask_tensor, mask_strides, mask_flags = _mask_arguments(mask, query)
    lse = lse.contiguous()
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=query.device)

    if seq_q > 0:
        block_dv = triton.next_power_of_2(value.shape[3])
        # two (rows x head dim) fp32 tiles in registers: fewer rows for wide heads (d256 spilled at 64)
        delta_block = 16 if INTERPRETED else max(16, min(64, 8192 // block_dv))
        _attention_backward_delta_kernel[(triton.cdiv(seq_q, delta_block) * batch * heads,)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq_q,
            HEAD_DIM_V=value.shape[3], BLOCK_DV=block_dv, BLOCK_M=delta_block,
        )
    if seq_k > 0:
        key_grid = lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]) * batch * heads,)  # noqa: E731
        _attention_backward_key_kernel[key_grid](
            query, key, value, mask_tensor, grad_out, lse, delta, grad_key, grad_value,
            *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(),
            *grad_key.stride(), *grad_value.stride(),
            sm_scale=scale, **mask_flags, **shape,
        )
    if seq_q > 0:
        query_grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
        _attention_backward_query_kernel[query_grid](
            query, key, value, mask_tensor, grad_out, lse, delta, grad_query,
            *query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride(),
            *grad_query.stride(),
            sm_scale=scale, **mask_flags, **shape,
        )
    return grad_query, grad_key, grad_value
