// Flash attention, forward and backward, in CUDA C++. The op schemas are defined in Python
// (vkernels/ops/attention.py); this file registers their CUDA implementations:
//   attention_cuda(q, k, v, mask?, bias?, is_causal, scale, rotary_cos?, rotary_sin?, rotary_interleaved)
//       -> (out, lse)
//   attention_backward_cuda(dout, q, k, v, out, lse, mask?, bias?, is_causal, scale, bias_requires_grad,
//       rotary_cos?, rotary_sin?, rotary_interleaved) -> (dq, dk, dv, dbias?)
//   varlen_attention_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
//       rotary_cos?, rotary_sin?, rotary_interleaved) -> (out, lse)
//   varlen_attention_backward_cuda(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
//       max_seqlen_k, is_causal, scale, rotary_cos?, rotary_sin?, rotary_interleaved) -> (dq, dk, dv)
// q (B0,B1,H,Lq,D), k (B0,B1,H,Lk,D), v (B0,B1,H,Lk,Dv), or 4-D (B0 = 1), read through their strides
// (copied when the head dim's is not 1): three batch levels, so that windows of an image batch (Swin:
// B0 images, B1 windows) index a per-window mask and a per-head bias without copies. The mask (bool, True = attend, or
// additive float) and the bias (additive float) broadcast to (B0,B1,H,Lq,Lk) through size-1 dims,
// read with stride 0, and are added in one pass. out is laid out (B0,B1,Lq,H,Dv) in memory, as
// FlashAttention's (vkernels.shapes.empty_attention_output). Causal is top-left aligned (query i
// sees key j iff j <= i). lse is the natural-log log-sum-exp of the scaled, masked logits; a fully
// masked row gives out = 0 and lse = +inf, so the backward's P = exp(s - lse) is 0 there.
// dbias = dS = P (dP - delta) summed over the batch entries, rows and columns the bias broadcasts
// over, by its own kernel (bias gradient, below). The backward is deterministic: no atomics.
//
// Packed batches (varlen_attention): q (total_q, Hq, D), k and v (total_k, Hkv, .) are read as
// (1, batch, H, total, .) views with stride 0 over the sequences, and each block finds its sequence's
// first rows and lengths in cu_seqlens (Problem, sequence_of); grids span the longest sequence and
// blocks past their sequence's end return, so one launch serves every sequence. Query head h reads
// key/value head h / kv_group; the dK/dV kernels run over key/value heads and step through the group's
// query heads in head order (a fixed summation order). lse is (Hq, total_q).
// Rotary embeddings: the tensor-core kernels rotate the q and k tiles in shared memory once they have
// landed (fp32 math, rounded to the input dtype as q and k rotated before the kernels would be), and
// un-rotate dQ and dK from their fp32 accumulators through fp32 staging rows before the stores; the
// fp32 kernels get q and k rotated in ATen first (rotated_columns) and their dq, dk un-rotated after.
//
// fp16/bf16 run on tensor cores (mma.sync m16n8k16, fp32 accumulators in registers); fp32 runs a
// plain-FMA kernel (a warp per query or key row) that serves as the exact reference path.
//
// Tensor-core tiling (head-dim classes HD in {32, 64, 128, 256}: max(D, Dv) rounded up; the tiles
// are sized for HD but every loop over the head dim stops at round_up(D or Dv, 16) at run time, so a
// head dim of 80 issues the mma work of 80, not of 128):
//   forward   block = kBlockM queries (each warp owns kWarpTiles m16 tiles), loops over kBlockN-key
//             tiles; S = Q K^T and O += P V in registers; online softmax in base 2 with the scale
//             folded in (exp2(s * scale * log2 e - max)).
//   dK/dV     block = 16 keys per warp, loops over kBlockM-query tiles; S^T = K Q^T and dP^T = V dO^T
//             in registers, P^T and dS^T = P^T (dP^T - delta) reused in registers as the A operand of
//             dV += P^T dO and dK += dS^T Q. For HD = 256 the grid also splits dK/dV's columns into
//             two 128-wide slices (S and dP are recomputed per slice) to bound the accumulators.
//   dQ        block = 16 queries per warp, loops over key tiles; dQ += dS K.
//   dbias     block = one kBlockM x kBlockN tile of the bias (16 queries per warp) and one chunk of
//             the batch entries it sums over, which it steps through in order, recomputing S, dP
//             and dS there (score_grad_tile, dQ's too) and adding dS in registers; a bias of one
//             row (column) steps through every query (key) block. The chunks' fp32 partial sums
//             are added in chunk order after the kernel; the chunks depend on shapes only
//             (bias_grad_chunks, the Triton backend's rule), so reruns are bit-identical.
//   delta     rowsum(dO * O) per query, a preprocess.
// Streaming tiles (K/V in forward and dQ, Q/dO in dK/dV) are double-buffered: at the top of each
// iteration every thread waits for its cp.async group, one __syncthreads publishes the tile and
// proves everyone is done reading the other stage, and the next tile is issued into that stage.
// dbias has one stage (a step mostly moves all four tiles; other resident blocks hide the copies).
// Shared rows are padded by 16 bytes (row pitch HD + 8 elements), so the 8 row addresses of every
// ldmatrix phase fall into distinct 16-byte bank groups. Rows past the lengths and columns past the
// head dim are zero-filled by cp.async (src-size 0), so they add exact zeros, never NaN.
//
// Fragment layouts relied on (PTX ISA, mma.m16n8k16 .f16/.bf16; g = lane / 4, t = lane % 4):
//   A (16x16, row):  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 8+2t..)  a3 = (g+8, 8+2t..)
//   B (16x8, col):   b0 = (k = 2t..2t+1, n = g)            b1 = (k = 8+2t.., n = g)
//   C (16x8, f32):   c0,c1 = (g, 2t..2t+1)                 c2,c3 = (g+8, 2t..2t+1)
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane L receives, in register
//   i, row L/4, columns 2(L%4)..+1 of matrix i (.trans: column L/4, rows 2(L%4)..+1).
// Hence: A from a row-major [m][k] tile with lane row L%16, column 8*(L/16); B from an [n][k] tile
// (K for Q K^T) without .trans, lane row (L%8) + 8*(L/16), column 8*((L/8)%2), giving b0,b1 of n
// tiles j and j+1; B from a [k][n] tile (V for P V) with .trans and the A addressing. Two adjacent
// C tiles of S (keys 16c..16c+15) are exactly the A fragment of P for the k-chunk c, so P never
// leaves registers.
#include <ATen/ExpandUtils.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "mma.cuh"
#include "runtime.cuh"

namespace vkernels {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxHeadDim = 256;

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

// A (B0, B1, H, L, dim) tensor with a unit last stride; strides in elements (0 on broadcast levels).
template <typename Pointer>
struct Strided {
  Pointer data;
  int64_t stride0, stride1, stride2, stride_row;
};
using Operand = Strided<const void*>;
using Output = Strided<void*>;

enum MaskKind : int { kMaskBool = 0, kMaskSameDtype = 1, kMaskFloat = 2 };

// A mask or bias broadcast to (B0, B1, H, Lq, Lk): stride 0 along the dims it broadcasts over.
struct Mask {
  const void* data;  // nullptr when absent
  int64_t stride0, stride1, stride2, stride_q, stride_k;
  int kind;
};

// What is added to the scaled logits: the mask (bool or additive) and the bias (additive).
struct Masks {
  Mask mask, bias;
};

struct Problem {
  int batch1, heads, len_q, len_k, dim_qk, dim_v;  // batch1 = B1, heads = H (the batch levels but B0)
  int kv_group;  // query heads per key/value head: query head h reads key/value head h / kv_group
  // A packed batch (varlen_attention): B0 = 1, B1 = the sequences, len_q/len_k their maximum lengths,
  // and sequence b is rows cu_seqlens[b] to cu_seqlens[b + 1] (int32); nullptr otherwise.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  bool causal;
  float scale, scale_log2;
};

// Rotary tables (float32, unit column stride) as (B0, B1, H, L, R) strides; dim = R, 0 without rotation.
struct Rotary {
  Operand cos, sin;
  int dim;
  bool interleaved;
};

// lse and delta are (B0, B1, H, Lq) row statistics with a unit row stride (packed: (H, total_q)).
struct ForwardArgs {
  Operand q, k, v;
  Masks masks;
  Problem p;
  Rotary rotary;
  Output out;  // laid out (B0, B1, Lq, H, Dv)
  Output lse;
};

struct BackwardArgs {
  Operand q, k, v, out, grad_out;
  Masks masks;
  Problem p;
  Rotary rotary;
  Operand lse;
  Output delta;                  // rowsum(dO * O)
  Output grad_q, grad_k, grad_v;  // shapes of q, k, v
};

// How the bias gradient sums dS: the bias has kept0 x kept1 x kept2 batch entries ("groups"; each
// kept_l is B_l or 1) of rows x cols; each stands for reduced_l = B_l / kept_l entries of every level,
// num_entries in all, enumerated e = (r0 * reduced1 + r1) * reduced2 + r2 and summed in chunks of
// chunk_size consecutive entries into partial[chunk][group][row][col] (float32, contiguous).
struct BiasGradSum {
  float* partial;
  int kept1, kept2, groups, reduced1, reduced2, num_entries, chunk_size, chunks;
  int rows, cols;                // the bias's: 1 where it is summed over the query rows or the keys
  bool reduce_rows, reduce_cols;  // rows == 1 < Lq, cols == 1 < Lk
};

// ---------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

// Batch entry (i0, i1, i2) of the flat index bh = (i0 * B1 + i1) * H + i2.
struct Entry {
  int64_t i0, i1, i2;
};

// (heads: the key/value heads for the grids over them)
__device__ __forceinline__ Entry batch_entry(const Problem& p, int64_t bh, int heads) {
  return {bh / (static_cast<int64_t>(p.batch1) * heads), (bh / heads) % p.batch1, bh % heads};
}
__device__ __forceinline__ Entry batch_entry(const Problem& p, int64_t bh) { return batch_entry(p, bh, p.heads); }

// The key/value head that query entry e reads.
__device__ __forceinline__ Entry kv_entry(const Problem& p, const Entry& e) { return {e.i0, e.i1, e.i2 / p.kv_group}; }

// One batch entry's problem: for a packed batch its sequence's lengths and first query and key rows.
struct Sequence {
  Problem p;
  int q_begin, k_begin;
};

__device__ __forceinline__ Sequence sequence_of(const Problem& p, const Entry& e) {
  Sequence s{p, 0, 0};
  if (p.cu_seqlens_q != nullptr) {
    s.q_begin = p.cu_seqlens_q[e.i1];
    s.k_begin = p.cu_seqlens_k[e.i1];
    s.p.len_q = p.cu_seqlens_q[e.i1 + 1] - s.q_begin;
    s.p.len_k = p.cu_seqlens_k[e.i1 + 1] - s.k_begin;
  }
  return s;
}

// Element offset of batch entry e in a tensor with strides stride0..2 (a Strided or a Mask).
template <typename Tensor>
__device__ __forceinline__ int64_t entry_offset(const Tensor& t, const Entry& e) {
  return e.i0 * t.stride0 + e.i1 * t.stride1 + e.i2 * t.stride2;
}

// Row first_row of batch entry e (a packed sequence's rows start at its first token).
template <typename T>
__device__ __forceinline__ const T* at_entry(const Operand& o, const Entry& e, int64_t first_row = 0) {
  return static_cast<const T*>(o.data) + entry_offset(o, e) + first_row * o.stride_row;
}

template <typename T>
__device__ __forceinline__ T* at_entry(const Output& o, const Entry& e, int64_t first_row = 0) {
  return static_cast<T*>(o.data) + entry_offset(o, e) + first_row * o.stride_row;
}

// One batch entry's rotary tables: row r (a token of the entry's sequence) at cos + r * cos_stride.
struct RotaryRows {
  const float* cos;
  const float* sin;
  int64_t cos_stride, sin_stride;
  int dim;
  bool interleaved;
};

__device__ __forceinline__ RotaryRows rotary_rows(const Rotary& r, const Entry& e, int64_t first_row) {
  return {at_entry<float>(r.cos, e, first_row), at_entry<float>(r.sin, e, first_row), r.cos.stride_row,
          r.sin.stride_row, r.dim, r.interleaved};
}

// The other column of column c's rotary pair (c < R): c ^ 1 interleaved, c -+ R/2 rotate-half.
__device__ __forceinline__ int rotary_partner(const RotaryRows& t, int c) {
  return t.interleaved ? c ^ 1 : (c < t.dim / 2 ? c + t.dim / 2 : c - t.dim / 2);
}

// Column c (< R) of a row rotated: with p its pair partner, y_c = x_c cos_c - x_p sin_c for the pair's
// first column (c of rotate-half's first half, even c interleaved) and + x_p sin_c for its second;
// inverse (the gradient of a rotated column, un-rotated): y_c = x_c cos_c + x_p sin_p, - x_p sin_p.
// In fp32; tables are read per column (their halves need not repeat).
__device__ __forceinline__ float rotated_column(const RotaryRows& t, int row, int c, float x, float x_partner,
                                                bool inverse) {
  const bool first = t.interleaved ? c % 2 == 0 : c < t.dim / 2;
  const float product = x_partner * t.sin[row * t.sin_stride + (inverse ? rotary_partner(t, c) : c)];
  return x * t.cos[row * t.cos_stride + c] + (first == inverse ? product : -product);
}

// Element offsets of one batch entry into the mask and the bias.
struct MaskOffsets {
  int64_t mask, bias;
};

__device__ __forceinline__ MaskOffsets mask_offsets(const Masks& m, const Entry& e) {
  return {entry_offset(m.mask, e), entry_offset(m.bias, e)};
}

// Two floats as one 32-bit register of T pairs, the lower column in the low half (mma operand order).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    memcpy(&bits, &pair, sizeof(bits));
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &pair, sizeof(bits));
  }
  return bits;
}

// The A fragment of the k-chunk made of two adjacent C tiles (columns 16c..16c+15), as T.
template <typename T>
__device__ __forceinline__ void c_tiles_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack_pair<T>(lo[0], lo[1]);
  a[1] = pack_pair<T>(lo[2], lo[3]);
  a[2] = pack_pair<T>(hi[0], hi[1]);
  a[3] = pack_pair<T>(hi[2], hi[3]);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Additive mask value in base-2 logit units. A boolean False and an additive -inf give -inf; finite
// values are clamped to -FLT_MAX so that e.g. finfo(float32).min * log2(e) stays finite (a row made
// only of such values is then uniform, as in SDPA, not empty).
template <typename T>
__device__ __forceinline__ float mask_logit2(const Mask& mask, int64_t offset) {
  if (mask.kind == kMaskBool) return static_cast<const uint8_t*>(mask.data)[offset] ? 0.0f : -INFINITY;
  const float x = mask.kind == kMaskFloat ? static_cast<const float*>(mask.data)[offset]
                                          : to_float(static_cast<const T*>(mask.data)[offset]);
  return x == -INFINITY ? x : fmaxf(x * kLog2e, -FLT_MAX);
}

// What the mask and the bias add to the base-2 logit of (row = query, col = key) of the entry at `at`.
template <typename T>
__device__ __forceinline__ float masks_logit2(const Masks& m, const MaskOffsets& at, int row, int col) {
  float s = 0.0f;
  if (m.mask.data != nullptr) s += mask_logit2<T>(m.mask, at.mask + row * m.mask.stride_q + col * m.mask.stride_k);
  if (m.bias.data != nullptr) s += mask_logit2<T>(m.bias, at.bias + row * m.bias.stride_q + col * m.bias.stride_k);
  return s;
}

// Base-2 logit of score element (row = query, col = key) from its dot product q.k; -inf outside
// the lengths, above the causal diagonal, or where the mask forbids. `edge` is false for tiles that
// are known to lie inside the lengths and below the diagonal, which skips the comparisons.
template <typename T, bool kHasMasks>
__device__ __forceinline__ float logit2(float dot, int row, int col, bool edge, const Problem& p, const Masks& masks,
                                        const MaskOffsets& at) {
  if (edge && (row >= p.len_q || col >= p.len_k || (p.causal && col > row))) return -INFINITY;
  float s = dot * p.scale_log2;
  if constexpr (kHasMasks) s += masks_logit2<T>(masks, at, row, col);
  return s;
}

// Starts cp.async copies of rows [row0, row0 + kRows) of a row-strided (len x dim) matrix into a
// [kRows][HD + 8] shared tile, columns [0, cols) with cols = dim rounded up to 16. Rows past len and
// columns past dim are zero-filled.
template <int kRows, int HD, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t row_stride, int row0, int len, int dim,
                                                int cols) {
  constexpr int kChunksPerRow = HD / 8;  // 16-byte chunks
  static_assert(kThreads % kChunksPerRow == 0, "a thread keeps one column across the rows it copies");
  constexpr int kRowStep = kThreads / kChunksPerRow;
  const int col = (threadIdx.x % kChunksPerRow) * 8;
  if (col >= cols) return;
  const int row_first = threadIdx.x / kChunksPerRow;
  uint32_t dst = smem_u32(tile) + (row_first * (HD + 8) + col) * 2;
  const T* from = src + (row0 + row_first) * row_stride + col;
#pragma unroll
  for (int row = row_first, i = 0; i < ceil_div(kRows, kRowStep); ++i, row += kRowStep) {
    if (kRows % kRowStep == 0 || row < kRows) {
      const bool valid = row0 + row < len && col < dim;
      cp_async_16(dst, valid ? from : src, valid);
    }
    dst += kRowStep * (HD + 8) * 2;
    from += kRowStep * row_stride;
  }
}

// acc += A B^T for one warp: A is 16 rows of a [.][kLd] shared tile at a_addr (with a_lane_offset),
// B is 8 * kTiles rows of one at b_addr (with b_lane_offset), both over head-dim columns [0, 16 * chunks)
// (chunks <= HD / 16: the head dim rounded up to 16).
template <typename T, int HD, int kTiles, int kLd>
__device__ __forceinline__ void mma_rows_by_tile(float (&acc)[kTiles][4], uint32_t a_addr, uint32_t b_addr,
                                                 int chunks) {
#pragma unroll
  for (int kc = 0; kc < HD / 16; ++kc) {
    if (kc < chunks) {
      uint32_t a[4];
      ldmatrix_x4(a, a_addr + kc * 16 * 2);
#pragma unroll
      for (int np = 0; np < kTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, b_addr + (np * 16 * kLd + kc * 16) * 2);
        mma_16816<T>(acc[2 * np], a, b[0], b[1]);
        mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

// Stores a warp's 16 x (8 * kTiles) fp32 accumulator tile, times `factor`, to rows [row0, row0 + 16)
// and columns [col0, col0 + 8 * kTiles) of a (len x dim) matrix with row stride row_stride (16-byte
// aligned rows), through the warp's own 16 rows of a [.][kLd] shared tile (`stage`, which no other
// warp reads) so that global stores are 16 bytes wide. Rows past len and columns past dim are dropped.
template <typename T, int kTiles, int kLd>
__device__ __forceinline__ void store_warp_tile(const float (&acc)[kTiles][4], float factor, T* stage, T* dst,
                                                int64_t row_stride, int row0, int len, int col0, int dim, int lane) {
  const int group = lane / 4, quad_lane = lane % 4;
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint32_t pair = pack_pair<T>(acc[j][2 * half] * factor, acc[j][2 * half + 1] * factor);
      *reinterpret_cast<uint32_t*>(stage + (group + 8 * half) * kLd + j * 8 + 2 * quad_lane) = pair;
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = kTiles;  // 8 elements = 16 bytes per chunk
#pragma unroll
  for (int i = 0; i < ceil_div(16 * kChunksPerRow, 32); ++i) {
    const int chunk = i * 32 + lane;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    if (row < 16 && row0 + row < len && col0 + col < dim) {
      *reinterpret_cast<uint4*>(dst + (row0 + row) * row_stride + col0 + col) =
          *reinterpret_cast<const uint4*>(stage + row * kLd + col);
    }
  }
}

// Rotates rows [0, kRows) of a [kRows][HD + 8] shared tile in place, pair by pair, rounding to T
// (as q and k rotated before the kernels would be): tile row r is token row0 + r of the tables `t`.
// Rows past len (zero-filled) are left. The caller synchronises the block before and after.
template <int kRows, int HD, int kThreads, typename T>
__device__ __forceinline__ void rotate_tile(T* tile, const RotaryRows& t, int row0, int len) {
  const int pairs = t.dim / 2;
  for (int i = threadIdx.x; i < kRows * pairs; i += kThreads) {
    const int r = i / pairs, pair = i % pairs;
    if (row0 + r >= len) break;  // i grows with r
    const int a = t.interleaved ? 2 * pair : pair, b = rotary_partner(t, a);
    T* row = tile + r * (HD + 8);
    const float x_a = to_float(row[a]), x_b = to_float(row[b]);
    row[a] = from_float<T>(rotated_column(t, row0 + r, a, x_a, x_b, false));
    row[b] = from_float<T>(rotated_column(t, row0 + r, b, x_b, x_a, false));
  }
}

// q and k rotated as they land in shared memory (forward, dQ, bias gradient): once the block has
// synchronised on the copies, rotates the key tile (tokens n0..) and, with its first key tile, the
// query tile (tokens m0..), then synchronises again.
template <int kBlockM, int kBlockN, int HD, int kThreads, typename T>
__device__ __forceinline__ void rotate_landed_tiles(T* q_tile, T* k_tile, const RotaryRows& q_rows,
                                                    const RotaryRows& k_rows, int m0, int n0, const Problem& p,
                                                    bool first_key_tile) {
  if (first_key_tile) rotate_tile<kBlockM, HD, kThreads>(q_tile, q_rows, m0, p.len_q);
  rotate_tile<kBlockN, HD, kThreads>(k_tile, k_rows, n0, p.len_k);
  __syncthreads();
}

// store_warp_tile for the gradient of a rotated q or k: the warp's fp32 tile times `factor` is staged
// in `stage` (16 x 8 kTiles floats that only this warp uses), un-rotated in fp32 by the tables' rows of
// its tokens (row0 + r of `t`; the pairs of columns col0.. must lie inside the tile), and stored
// element by element. Rows past len and columns past dim are dropped.
template <typename T, int kTiles>
__device__ __forceinline__ void store_warp_tile_unrotated(const float (&acc)[kTiles][4], float factor, float* stage,
                                                          T* dst, int64_t row_stride, int row0, int len, int col0,
                                                          int dim, const RotaryRows& t, int lane) {
  constexpr int kCols = 8 * kTiles;
  const int group = lane / 4, quad_lane = lane % 4;
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      stage[(group + 8 * (r / 2)) * kCols + j * 8 + 2 * quad_lane + (r & 1)] = acc[j][r] * factor;
    }
  }
  __syncwarp();
  for (int i = lane; i < 16 * kCols; i += 32) {
    const int r = i / kCols, c = i % kCols, row = row0 + r, col = col0 + c;
    if (row >= len || col >= dim) continue;
    float x = stage[i];
    if (col < t.dim) x = rotated_column(t, row, col, x, stage[r * kCols + rotary_partner(t, col) - col0], true);
    dst[row * row_stride + col] = from_float<T>(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Tile configurations (one per head-dim class; tuning knobs for the GPU)
// ---------------------------------------------------------------------------------------------

template <int HD>
struct ForwardTiles {
  static constexpr int kWarps = HD == 256 ? 8 : 4;
  static constexpr int kWarpTiles = HD == 256 ? 1 : 2;  // m16 query tiles per warp: K/V fragments reused
  static constexpr int kBlockM = 16 * kWarpTiles * kWarps;
  static constexpr int kBlockN = HD >= 128 ? 32 : 64;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = HD + 8;
  // Q tile, then K and V tiles in two stages each.
  static constexpr size_t kSmemBytes = size_t(kBlockM + 4 * kBlockN) * kLd * 2;
};

template <int HD>
struct KeyValueGradTiles {
  static constexpr int kWarps = HD <= 64 ? 8 : 4;
  static constexpr int kBlockN = 16 * kWarps;  // keys owned by the block, 16 per warp
  static constexpr int kBlockM = HD >= 128 ? 32 : 64;
  static constexpr int kSliceDim = HD < 128 ? HD : 128;  // dK/dV columns accumulated per block
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = HD + 8;
  // K and V tiles, then Q and dO tiles in two stages each, then lse and delta in two stages.
  static constexpr size_t kSmemBytes = size_t(2 * kBlockN + 4 * kBlockM) * kLd * 2 + 4 * kBlockM * sizeof(float);
};

template <int HD>
struct QueryGradTiles {
  static constexpr int kWarps = HD <= 64 ? 8 : 4;
  static constexpr int kBlockM = 16 * kWarps;  // queries owned by the block, 16 per warp
  static constexpr int kBlockN = HD == 256 ? 32 : 64;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = HD + 8;
  // Q and dO tiles, then K and V tiles in two stages each.
  static constexpr size_t kSmemBytes = size_t(2 * kBlockM + 4 * kBlockN) * kLd * 2;
};

template <int HD>
struct BiasGradTiles {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 16 * kWarps;          // bias rows (queries) of the block's tile, 16 per warp
  static constexpr int kBlockN = HD == 256 ? 32 : 64;  // bias columns (keys)
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = HD + 8;
  // Q and dO tiles, then K and V tiles, one stage each.
  static constexpr size_t kSmemBytes = size_t(2 * kBlockM + 2 * kBlockN) * kLd * 2;
};

// ---------------------------------------------------------------------------------------------
// Tensor-core forward
// ---------------------------------------------------------------------------------------------

template <typename T, int HD, bool kHasMasks>
__global__ void __launch_bounds__(ForwardTiles<HD>::kThreads) attention_forward_kernel(const ForwardArgs args) {
  using Tiles = ForwardTiles<HD>;
  constexpr int kWarpTiles = Tiles::kWarpTiles, kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kLd = Tiles::kLd, kThreads = Tiles::kThreads;
  constexpr int kScoreTiles = kBlockN / 8, kOutTiles = HD / 8;

  VKERNELS_DYNAMIC_SHARED(shared);
  T* const q_tile = reinterpret_cast<T*>(shared);
  T* const k_tiles = q_tile + kBlockM * kLd;
  T* const v_tiles = k_tiles + 2 * kBlockN * kLd;

  const int num_m_blocks = ceil_div(args.p.len_q, kBlockM);
  // Last query blocks first: under causal masking they are the longest.
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const int64_t bh = blockIdx.x / num_m_blocks;
  const Entry entry = batch_entry(args.p, bh), kv = kv_entry(args.p, entry);
  const Sequence sequence = sequence_of(args.p, entry);
  const Problem& p = sequence.p;
  const int m0 = m_block * kBlockM;
  if (m0 >= p.len_q) return;  // past the end of a packed sequence
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
  const int warp_row0 = warp * 16 * kWarpTiles;  // first query row of the warp inside the block
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);
  const int qk_chunks = qk_cols / 16, v_chunks = v_cols / 16;

  const T* q = at_entry<T>(args.q, entry, sequence.q_begin);
  const T* k = at_entry<T>(args.k, kv, sequence.k_begin);
  const T* v = at_entry<T>(args.v, kv, sequence.k_begin);
  const MaskOffsets masks_at = mask_offsets(args.masks, entry);
  const bool rotary = args.rotary.dim > 0;

  int n_end = ceil_div(p.len_k, kBlockN);
  if (p.causal) n_end = min(n_end, ceil_div(min(m0 + kBlockM, p.len_q), kBlockN));

  load_tile_async<kBlockM, HD, kThreads>(q_tile, q, args.q.stride_row, m0, p.len_q, p.dim_qk, qk_cols);
  if (n_end > 0) {
    load_tile_async<kBlockN, HD, kThreads>(k_tiles, k, args.k.stride_row, 0, p.len_k, p.dim_qk, qk_cols);
    load_tile_async<kBlockN, HD, kThreads>(v_tiles, v, args.v.stride_row, 0, p.len_k, p.dim_v, v_cols);
  }
  cp_async_commit();

  const uint32_t q_addr = smem_u32(q_tile) + warp_row0 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t k_addr = smem_u32(k_tiles) + b_lane_offset<kLd>(lane);
  const uint32_t v_addr = smem_u32(v_tiles) + a_lane_offset<kLd>(lane);
  constexpr uint32_t kStageBytes = kBlockN * kLd * 2;

  float acc_o[kWarpTiles][kOutTiles][4] = {};
  float row_max[kWarpTiles][2];  // running max of the base-2 logits of rows group and group + 8
  float row_sum[kWarpTiles][2] = {};  // this thread's partial sums; reduced over the quad at the end
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) row_max[mi][0] = row_max[mi][1] = -INFINITY;

  for (int n_block = 0; n_block < n_end; ++n_block) {
    const uint32_t stage = (n_block & 1) * kStageBytes;
    cp_async_wait_all();
    __syncthreads();
    if (n_block + 1 < n_end) {
      const int next = (n_block + 1) & 1;
      load_tile_async<kBlockN, HD, kThreads>(k_tiles + next * kBlockN * kLd, k, args.k.stride_row,
                                             (n_block + 1) * kBlockN, p.len_k, p.dim_qk, qk_cols);
      load_tile_async<kBlockN, HD, kThreads>(v_tiles + next * kBlockN * kLd, v, args.v.stride_row,
                                             (n_block + 1) * kBlockN, p.len_k, p.dim_v, v_cols);
    }
    cp_async_commit();
    if (rotary) {
      rotate_landed_tiles<kBlockM, kBlockN, HD, kThreads>(q_tile, k_tiles + (n_block & 1) * kBlockN * kLd,
                                                          rotary_rows(args.rotary, entry, sequence.q_begin),
                                                          rotary_rows(args.rotary, kv, sequence.k_begin), m0,
                                                          n_block * kBlockN, p, n_block == 0);
    }

    // S = Q K^T
    float acc_s[kWarpTiles][kScoreTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) {
      if (kc < qk_chunks) {
        uint32_t a[kWarpTiles][4];
#pragma unroll
        for (int mi = 0; mi < kWarpTiles; ++mi) ldmatrix_x4(a[mi], q_addr + (mi * 16 * kLd + kc * 16) * 2);
#pragma unroll
        for (int np = 0; np < kScoreTiles / 2; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, k_addr + stage + (np * 16 * kLd + kc * 16) * 2);
#pragma unroll
          for (int mi = 0; mi < kWarpTiles; ++mi) {
            mma_16816<T>(acc_s[mi][2 * np], a[mi], bk[0], bk[1]);
            mma_16816<T>(acc_s[mi][2 * np + 1], a[mi], bk[2], bk[3]);
          }
        }
      }
    }

    // Scaled, masked base-2 logits, then the online softmax update.
    const int n0 = n_block * kBlockN;
    const int row_first = m0 + warp_row0;
    const bool edge = row_first + 16 * kWarpTiles > p.len_q || n0 + kBlockN > p.len_k ||
                      (p.causal && n0 + kBlockN - 1 > row_first);
#pragma unroll
    for (int mi = 0; mi < kWarpTiles; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_first + mi * 16 + group + 8 * half;
        float tile_max = row_max[mi][half];
#pragma unroll
        for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + nj * 8 + 2 * quad_lane + e;
            float& s = acc_s[mi][nj][2 * half + e];
            s = logit2<T, kHasMasks>(s, row, col, edge, p, args.masks, masks_at);
            tile_max = fmaxf(tile_max, s);
          }
        }
        tile_max = quad_max(tile_max);
        // A row with nothing visible yet keeps max -inf; exponentiate against 0 so that every
        // exp2 below is exp2(-inf) = 0 instead of NaN.
        const float base = tile_max == -INFINITY ? 0.0f : tile_max;
        const float rescale = exp2_approx(row_max[mi][half] - base);
        row_max[mi][half] = tile_max;
        float sum = 0.0f;
#pragma unroll
        for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& s = acc_s[mi][nj][2 * half + e];
            s = exp2_approx(s - base);
            sum += s;
          }
        }
        row_sum[mi][half] = row_sum[mi][half] * rescale + sum;
#pragma unroll
        for (int dj = 0; dj < kOutTiles; ++dj) {
          acc_o[mi][dj][2 * half] *= rescale;
          acc_o[mi][dj][2 * half + 1] *= rescale;
        }
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kWarpTiles][4];
#pragma unroll
      for (int mi = 0; mi < kWarpTiles; ++mi) c_tiles_to_a<T>(a[mi], acc_s[mi][2 * kk], acc_s[mi][2 * kk + 1]);
#pragma unroll
      for (int dc = 0; dc < HD / 16; ++dc) {
        if (dc < v_chunks) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, v_addr + stage + (kk * 16 * kLd + dc * 16) * 2);
#pragma unroll
          for (int mi = 0; mi < kWarpTiles; ++mi) {
            mma_16816<T>(acc_o[mi][2 * dc], a[mi], bv[0], bv[1]);
            mma_16816<T>(acc_o[mi][2 * dc + 1], a[mi], bv[2], bv[3]);
          }
        }
      }
    }
  }

  // Epilogue: normalise, write lse, and stage O through this warp's own Q rows.
  // Without any key tile, the Q copies (issued by all threads) were never waited for.
  cp_async_wait_all();
  __syncthreads();
  float* lse = at_entry<float>(args.lse, entry, sequence.q_begin);
  T* out = at_entry<T>(args.out, entry, sequence.q_begin);
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
    float inv_sum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[mi][half]);
      inv_sum[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int row = m0 + warp_row0 + mi * 16 + group + 8 * half;
      if (quad_lane == 0 && row < p.len_q) {
        lse[row] = sum > 0.0f ? row_max[mi][half] * kLn2 + logf(sum) : INFINITY;
      }
    }
#pragma unroll
    for (int dj = 0; dj < kOutTiles; ++dj) {
      acc_o[mi][dj][0] *= inv_sum[0];
      acc_o[mi][dj][1] *= inv_sum[0];
      acc_o[mi][dj][2] *= inv_sum[1];
      acc_o[mi][dj][3] *= inv_sum[1];
    }
    store_warp_tile<T, kOutTiles, kLd>(acc_o[mi], 1.0f, q_tile + (warp_row0 + mi * 16) * kLd, out,
                                       args.out.stride_row, m0 + warp_row0 + mi * 16, p.len_q, 0, p.dim_v, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core backward
// ---------------------------------------------------------------------------------------------

// delta[row] = sum_d dO[row, d] * O[row, d], one warp per query row (all dtypes). Packed batches
// come as one sequence of all tokens (their sequences do not matter here).
template <typename T>
__global__ void __launch_bounds__(256) attention_backward_delta_kernel(const BackwardArgs args, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const Problem& p = args.p;
  const int i = static_cast<int>(row % p.len_q);
  const Entry entry = batch_entry(p, row / p.len_q);
  const T* grad_out = at_entry<T>(args.grad_out, entry) + i * args.grad_out.stride_row;
  const T* out = at_entry<T>(args.out, entry) + i * args.out.stride_row;
  float sum = 0.0f;
  for (int d = lane; d < p.dim_v; d += 32) sum += to_float(grad_out[d]) * to_float(out[d]);
  sum = warp_sum(sum);
  if (lane == 0) at_entry<float>(args.delta, entry)[i] = sum;
}

template <typename T, int HD, bool kHasMasks>
__global__ void __launch_bounds__(KeyValueGradTiles<HD>::kThreads)
    attention_backward_key_value_kernel(const BackwardArgs args) {
  using Tiles = KeyValueGradTiles<HD>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kSliceDim = Tiles::kSliceDim;
  constexpr int kLd = Tiles::kLd, kThreads = Tiles::kThreads;
  constexpr int kScoreTiles = kBlockM / 8, kSliceTiles = kSliceDim / 8;

  VKERNELS_DYNAMIC_SHARED(shared);
  T* const k_tile = reinterpret_cast<T*>(shared);
  T* const v_tile = k_tile + kBlockN * kLd;
  T* const q_tiles = v_tile + kBlockN * kLd;
  T* const grad_out_tiles = q_tiles + 2 * kBlockM * kLd;
  float* const lse_tiles = reinterpret_cast<float*>(grad_out_tiles + 2 * kBlockM * kLd);
  float* const delta_tiles = lse_tiles + 2 * kBlockM;

  const int kv_heads = args.p.heads / args.p.kv_group;
  const int num_n_blocks = ceil_div(args.p.len_k, kBlockN);
  const int num_slices = ceil_div(max(args.p.dim_qk, args.p.dim_v), kSliceDim);
  const int n_block = static_cast<int>(blockIdx.x % num_n_blocks);
  const int slice = static_cast<int>(blockIdx.x / num_n_blocks) % num_slices;
  const int64_t bh = blockIdx.x / num_n_blocks / num_slices;
  const Entry entry = batch_entry(args.p, bh, kv_heads);  // a key/value head's
  const Sequence sequence = sequence_of(args.p, entry);
  const Problem& p = sequence.p;
  const int n0 = n_block * kBlockN;
  if (n0 >= p.len_k) return;  // past the end of a packed sequence
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);
  const int qk_chunks = qk_cols / 16, v_chunks = v_cols / 16;
  const int slice_chunk0 = slice * (kSliceDim / 16);

  // The group's query heads follow one another: head j of it at + j * stride2 from the first.
  const Entry first_query = {entry.i0, entry.i1, entry.i2 * p.kv_group};
  const T* q = at_entry<T>(args.q, first_query, sequence.q_begin);
  const T* k = at_entry<T>(args.k, entry, sequence.k_begin);
  const T* v = at_entry<T>(args.v, entry, sequence.k_begin);
  const T* grad_out = at_entry<T>(args.grad_out, first_query, sequence.q_begin);
  const float* lse = at_entry<float>(args.lse, first_query, sequence.q_begin);
  const float* delta = at_entry<float>(args.delta, first_query, sequence.q_begin);
  const MaskOffsets masks_at = mask_offsets(args.masks, entry);  // (masks come with kv_group = 1)
  const bool rotary = args.rotary.dim > 0;

  // Queries before the block's first key see none of its keys under causal masking. The steps run
  // over the group's query heads in head order, each over its query blocks, so that dK and dV sum the
  // heads in a fixed order and the pipeline runs on from one head to the next.
  const int m_begin = p.causal ? n0 / kBlockM : 0;
  const int m_blocks = max(ceil_div(p.len_q, kBlockM) - m_begin, 0);
  const int steps = m_blocks * p.kv_group;
  auto step_head = [&](int step) { return m_blocks > 0 ? step / m_blocks : 0; };
  auto step_block = [&](int step) { return m_begin + (m_blocks > 0 ? step % m_blocks : 0); };

  auto load_query_tile = [&](int step, int stage) {
    const int head = step_head(step), row0 = step_block(step) * kBlockM;
    const float* lse_head = lse + head * args.lse.stride2;
    const float* delta_head = delta + head * args.delta.stride2;
    load_tile_async<kBlockM, HD, kThreads>(q_tiles + stage * kBlockM * kLd, q + head * args.q.stride2,
                                           args.q.stride_row, row0, p.len_q, p.dim_qk, qk_cols);
    load_tile_async<kBlockM, HD, kThreads>(grad_out_tiles + stage * kBlockM * kLd,
                                           grad_out + head * args.grad_out.stride2, args.grad_out.stride_row, row0,
                                           p.len_q, p.dim_v, v_cols);
    if (threadIdx.x < kBlockM) {
      const int row = row0 + threadIdx.x;
      const bool valid = row < p.len_q;
      cp_async_4(smem_u32(lse_tiles + stage * kBlockM + threadIdx.x), valid ? lse_head + row : lse, valid);
      cp_async_4(smem_u32(delta_tiles + stage * kBlockM + threadIdx.x), valid ? delta_head + row : delta, valid);
    }
  };

  load_tile_async<kBlockN, HD, kThreads>(k_tile, k, args.k.stride_row, n0, p.len_k, p.dim_qk, qk_cols);
  load_tile_async<kBlockN, HD, kThreads>(v_tile, v, args.v.stride_row, n0, p.len_k, p.dim_v, v_cols);
  if (steps > 0) load_query_tile(0, 0);
  cp_async_commit();

  const uint32_t k_addr = smem_u32(k_tile) + warp * 16 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t v_addr = smem_u32(v_tile) + warp * 16 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t q_addr_b = smem_u32(q_tiles) + b_lane_offset<kLd>(lane);
  const uint32_t q_addr_t = smem_u32(q_tiles) + a_lane_offset<kLd>(lane);
  const uint32_t grad_out_addr_b = smem_u32(grad_out_tiles) + b_lane_offset<kLd>(lane);
  const uint32_t grad_out_addr_t = smem_u32(grad_out_tiles) + a_lane_offset<kLd>(lane);
  constexpr uint32_t kStageBytes = kBlockM * kLd * 2;

  float acc_dk[kSliceTiles][4] = {};
  float acc_dv[kSliceTiles][4] = {};
  const int key_first = n0 + warp * 16;

  for (int step = 0; step < steps; ++step) {
    const int m_block = step_block(step);
    const int stage_index = step & 1;
    const uint32_t stage = stage_index * kStageBytes;
    cp_async_wait_all();
    __syncthreads();
    if (step + 1 < steps) load_query_tile(step + 1, stage_index ^ 1);
    cp_async_commit();
    if (rotary) {  // q and k rotated as they land in shared memory
      if (step == 0) rotate_tile<kBlockN, HD, kThreads>(k_tile, rotary_rows(args.rotary, entry, sequence.k_begin), n0,
                                                        p.len_k);
      const Entry query = {first_query.i0, first_query.i1, first_query.i2 + step_head(step)};
      rotate_tile<kBlockM, HD, kThreads>(q_tiles + stage_index * kBlockM * kLd,
                                         rotary_rows(args.rotary, query, sequence.q_begin), m_block * kBlockM, p.len_q);
      __syncthreads();
    }

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
    float acc_s[kScoreTiles][4] = {};
    float acc_dp[kScoreTiles][4] = {};
    mma_rows_by_tile<T, HD, kScoreTiles, kLd>(acc_s, k_addr, q_addr_b + stage, qk_chunks);
    mma_rows_by_tile<T, HD, kScoreTiles, kLd>(acc_dp, v_addr, grad_out_addr_b + stage, v_chunks);

    // P^T = exp2(s - lse * log2 e) and dS^T = P^T (dP^T - delta), in place.
    const int m0 = m_block * kBlockM;
    const bool edge =
        m0 + kBlockM > p.len_q || key_first + 16 > p.len_k || (p.causal && key_first + 15 > m0);
    const float* lse_stage = lse_tiles + stage_index * kBlockM;
    const float* delta_stage = delta_tiles + stage_index * kBlockM;
#pragma unroll
    for (int qj = 0; qj < kScoreTiles; ++qj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = qj * 8 + 2 * quad_lane + e;  // query inside the tile
        const float lse2 = lse_stage[col] * kLog2e;
        const float row_delta = delta_stage[col];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int key = key_first + group + 8 * half;
          const float s =
              logit2<T, kHasMasks>(acc_s[qj][2 * half + e], m0 + col, key, edge, p, args.masks, masks_at);
          const float prob = exp2_approx(s - lse2);
          acc_s[qj][2 * half + e] = prob;
          acc_dp[qj][2 * half + e] = prob * (acc_dp[qj][2 * half + e] - row_delta);
        }
      }
    }

    // dV += P^T dO and dK += dS^T Q over this block's column slice.
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t a_p[4], a_ds[4];
      c_tiles_to_a<T>(a_p, acc_s[2 * kk], acc_s[2 * kk + 1]);
      c_tiles_to_a<T>(a_ds, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < kSliceDim / 16; ++j) {
        const int dc = slice_chunk0 + j;
        if (dc < v_chunks) {
          uint32_t bo[4];
          ldmatrix_x4_trans(bo, grad_out_addr_t + stage + (kk * 16 * kLd + dc * 16) * 2);
          mma_16816<T>(acc_dv[2 * j], a_p, bo[0], bo[1]);
          mma_16816<T>(acc_dv[2 * j + 1], a_p, bo[2], bo[3]);
        }
        if (dc < qk_chunks) {
          uint32_t bq[4];
          ldmatrix_x4_trans(bq, q_addr_t + stage + (kk * 16 * kLd + dc * 16) * 2);
          mma_16816<T>(acc_dk[2 * j], a_ds, bq[0], bq[1]);
          mma_16816<T>(acc_dk[2 * j + 1], a_ds, bq[2], bq[3]);
        }
      }
    }
  }

  // Epilogue: stage through this warp's own K and V rows (only this warp reads them).
  // Without any query tile, the K/V copies (issued by all threads) were never waited for.
  cp_async_wait_all();
  __syncthreads();
  T* grad_k = at_entry<T>(args.grad_k, entry, sequence.k_begin);
  if (rotary) {  // dK of the rotated k, un-rotated through fp32 rows over the Q tiles (free now)
    static_assert(kBlockN * kSliceDim * sizeof(float) <= 4 * kBlockM * kLd * 2, "the dK stage fits in the Q/dO tiles");
    float* const stage = reinterpret_cast<float*>(q_tiles) + warp * 16 * kSliceDim;
    store_warp_tile_unrotated<T, kSliceTiles>(acc_dk, p.scale, stage, grad_k, args.grad_k.stride_row, key_first,
                                              p.len_k, slice * kSliceDim, p.dim_qk,
                                              rotary_rows(args.rotary, entry, sequence.k_begin), lane);
  } else {
    store_warp_tile<T, kSliceTiles, kLd>(acc_dk, p.scale, k_tile + warp * 16 * kLd, grad_k, args.grad_k.stride_row,
                                         key_first, p.len_k, slice * kSliceDim, p.dim_qk, lane);
  }
  store_warp_tile<T, kSliceTiles, kLd>(acc_dv, 1.0f, v_tile + warp * 16 * kLd,
                                       at_entry<T>(args.grad_v, entry, sequence.k_begin), args.grad_v.stride_row,
                                       key_first, p.len_k, slice * kSliceDim, p.dim_v, lane);
}

// lse (base 2) and delta of this thread's rows row_first + group and row_first + group + 8 of one
// batch entry's (lse and delta at its first row). Rows past len_q get lse = +inf, hence P = 0.
__device__ __forceinline__ void load_row_statistics(float (&lse2)[2], float (&row_delta)[2], const float* lse,
                                                    const float* delta, int len_q, int row_first, int group) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_first + group + 8 * half;
    lse2[half] = row < len_q ? lse[row] * kLog2e : INFINITY;
    row_delta[half] = row < len_q ? delta[row] : 0.0f;
  }
}

// dS = P (dP - delta) of a warp's 16 queries (from row_first) x kBlockN keys (from n0), in C-fragment
// layout: S = Q K^T and dP = dO V^T from the warp's Q and dO rows (A operands at q_addr and
// grad_out_addr, with a_lane_offset) and the block's K and V tiles (B operands at k_addr and v_addr,
// with b_lane_offset) in [.][kLd] shared tiles; lse2 and row_delta from load_row_statistics; p the
// entry's problem.
template <typename T, int HD, int kBlockN, int kLd, bool kHasMasks>
__device__ __forceinline__ void score_grad_tile(float (&grad_s)[kBlockN / 8][4], uint32_t q_addr,
                                                uint32_t grad_out_addr, uint32_t k_addr, uint32_t v_addr,
                                                int row_first, int n0, const float (&lse2)[2],
                                                const float (&row_delta)[2], const Problem& p, const Masks& masks,
                                                const MaskOffsets& masks_at, int lane) {
  constexpr int kScoreTiles = kBlockN / 8;
  const int group = lane / 4, quad_lane = lane % 4;
  const int qk_chunks = ceil_div(p.dim_qk, 16), v_chunks = ceil_div(p.dim_v, 16);
  float acc_s[kScoreTiles][4] = {};
  float(&acc_dp)[kScoreTiles][4] = grad_s;  // dS replaces dP in place
#pragma unroll
  for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_dp[nj][r] = 0.0f;
  }
  mma_rows_by_tile<T, HD, kScoreTiles, kLd>(acc_s, q_addr, k_addr, qk_chunks);
  mma_rows_by_tile<T, HD, kScoreTiles, kLd>(acc_dp, grad_out_addr, v_addr, v_chunks);

  const bool edge = row_first + 16 > p.len_q || n0 + kBlockN > p.len_k || (p.causal && n0 + kBlockN - 1 > row_first);
#pragma unroll
  for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int half = r / 2;
      const int row = row_first + group + 8 * half;
      const int col = n0 + nj * 8 + 2 * quad_lane + (r & 1);
      const float s = logit2<T, kHasMasks>(acc_s[nj][r], row, col, edge, p, masks, masks_at);
      const float prob = exp2_approx(s - lse2[half]);
      acc_dp[nj][r] = prob * (acc_dp[nj][r] - row_delta[half]);
    }
  }
}

template <typename T, int HD, bool kHasMasks>
__global__ void __launch_bounds__(QueryGradTiles<HD>::kThreads)
    attention_backward_query_kernel(const BackwardArgs args) {
  using Tiles = QueryGradTiles<HD>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kLd = Tiles::kLd, kThreads = Tiles::kThreads;
  constexpr int kScoreTiles = kBlockN / 8, kOutTiles = HD / 8;

  VKERNELS_DYNAMIC_SHARED(shared);
  T* const q_tile = reinterpret_cast<T*>(shared);
  T* const grad_out_tile = q_tile + kBlockM * kLd;
  T* const k_tiles = grad_out_tile + kBlockM * kLd;
  T* const v_tiles = k_tiles + 2 * kBlockN * kLd;

  const int num_m_blocks = ceil_div(args.p.len_q, kBlockM);
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const int64_t bh = blockIdx.x / num_m_blocks;
  const Entry entry = batch_entry(args.p, bh), kv = kv_entry(args.p, entry);
  const Sequence sequence = sequence_of(args.p, entry);
  const Problem& p = sequence.p;
  const int m0 = m_block * kBlockM;
  if (m0 >= p.len_q) return;  // past the end of a packed sequence
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);
  const int qk_chunks = qk_cols / 16;

  const T* q = at_entry<T>(args.q, entry, sequence.q_begin);
  const T* k = at_entry<T>(args.k, kv, sequence.k_begin);
  const T* v = at_entry<T>(args.v, kv, sequence.k_begin);
  const T* grad_out = at_entry<T>(args.grad_out, entry, sequence.q_begin);
  const MaskOffsets masks_at = mask_offsets(args.masks, entry);
  const bool rotary = args.rotary.dim > 0;

  int n_end = ceil_div(p.len_k, kBlockN);
  if (p.causal) n_end = min(n_end, ceil_div(min(m0 + kBlockM, p.len_q), kBlockN));

  load_tile_async<kBlockM, HD, kThreads>(q_tile, q, args.q.stride_row, m0, p.len_q, p.dim_qk, qk_cols);
  load_tile_async<kBlockM, HD, kThreads>(grad_out_tile, grad_out, args.grad_out.stride_row, m0, p.len_q, p.dim_v,
                                         v_cols);
  if (n_end > 0) {
    load_tile_async<kBlockN, HD, kThreads>(k_tiles, k, args.k.stride_row, 0, p.len_k, p.dim_qk, qk_cols);
    load_tile_async<kBlockN, HD, kThreads>(v_tiles, v, args.v.stride_row, 0, p.len_k, p.dim_v, v_cols);
  }
  cp_async_commit();

  const int row_first = m0 + warp * 16;
  float lse2[2], row_delta[2];
  load_row_statistics(lse2, row_delta, at_entry<float>(args.lse, entry, sequence.q_begin),
                      at_entry<float>(args.delta, entry, sequence.q_begin), p.len_q, row_first, lane / 4);

  const uint32_t q_addr = smem_u32(q_tile) + warp * 16 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t grad_out_addr = smem_u32(grad_out_tile) + warp * 16 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t k_addr_b = smem_u32(k_tiles) + b_lane_offset<kLd>(lane);
  const uint32_t k_addr_t = smem_u32(k_tiles) + a_lane_offset<kLd>(lane);
  const uint32_t v_addr_b = smem_u32(v_tiles) + b_lane_offset<kLd>(lane);
  constexpr uint32_t kStageBytes = kBlockN * kLd * 2;

  float acc_dq[kOutTiles][4] = {};

  for (int n_block = 0; n_block < n_end; ++n_block) {
    const uint32_t stage = (n_block & 1) * kStageBytes;
    cp_async_wait_all();
    __syncthreads();
    if (n_block + 1 < n_end) {
      const int next = (n_block + 1) & 1;
      load_tile_async<kBlockN, HD, kThreads>(k_tiles + next * kBlockN * kLd, k, args.k.stride_row,
                                             (n_block + 1) * kBlockN, p.len_k, p.dim_qk, qk_cols);
      load_tile_async<kBlockN, HD, kThreads>(v_tiles + next * kBlockN * kLd, v, args.v.stride_row,
                                             (n_block + 1) * kBlockN, p.len_k, p.dim_v, v_cols);
    }
    cp_async_commit();
    if (rotary) {
      rotate_landed_tiles<kBlockM, kBlockN, HD, kThreads>(q_tile, k_tiles + (n_block & 1) * kBlockN * kLd,
                                                          rotary_rows(args.rotary, entry, sequence.q_begin),
                                                          rotary_rows(args.rotary, kv, sequence.k_begin), m0,
                                                          n_block * kBlockN, p, n_block == 0);
    }

    float grad_s[kScoreTiles][4];
    score_grad_tile<T, HD, kBlockN, kLd, kHasMasks>(grad_s, q_addr, grad_out_addr, k_addr_b + stage, v_addr_b + stage,
                                                    row_first, n_block * kBlockN, lse2, row_delta, p, args.masks,
                                                    masks_at, lane);

    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      c_tiles_to_a<T>(a, grad_s[2 * kk], grad_s[2 * kk + 1]);
#pragma unroll
      for (int dc = 0; dc < HD / 16; ++dc) {
        if (dc < qk_chunks) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, k_addr_t + stage + (kk * 16 * kLd + dc * 16) * 2);
          mma_16816<T>(acc_dq[2 * dc], a, bk[0], bk[1]);
          mma_16816<T>(acc_dq[2 * dc + 1], a, bk[2], bk[3]);
        }
      }
    }
  }

  // Without any key tile, the Q/dO copies (issued by all threads) were never waited for.
  cp_async_wait_all();
  __syncthreads();
  T* grad_q = at_entry<T>(args.grad_q, entry, sequence.q_begin);
  if (rotary) {  // dQ of the rotated q, un-rotated through fp32 rows over the Q and dO tiles (free now)
    static_assert(kBlockM * HD * sizeof(float) <= 2 * kBlockM * kLd * 2, "the dQ stage fits in the Q/dO tiles");
    store_warp_tile_unrotated<T, kOutTiles>(acc_dq, p.scale, reinterpret_cast<float*>(shared) + warp * 16 * HD, grad_q,
                                            args.grad_q.stride_row, row_first, p.len_q, 0, p.dim_qk,
                                            rotary_rows(args.rotary, entry, sequence.q_begin), lane);
  } else {
    store_warp_tile<T, kOutTiles, kLd>(acc_dq, p.scale, q_tile + warp * 16 * kLd, grad_q, args.grad_q.stride_row,
                                       row_first, p.len_q, 0, p.dim_qk, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 kernels: plain FMA, one warp per row, 4 rows (of one head) per block. Lane l owns head-dim
// columns l, l + 32, ... (up to 8 of them), and scores are computed 32 at a time, one key (or query)
// per lane.
// ---------------------------------------------------------------------------------------------

constexpr int kExactWarps = 4;
constexpr int kExactColumns = kMaxHeadDim / 32;

__device__ __forceinline__ float dot_shared_global(const float* shared_row, const float* global_row, int dim) {
  float acc = 0.0f;
#pragma unroll 8
  for (int d = 0; d < dim; ++d) acc = fmaf(shared_row[d], global_row[d], acc);
  return acc;
}

__device__ __forceinline__ void load_row_to_shared(float* dst, const float* src, int dim, int lane) {
  for (int d = lane; d < dim; d += 32) dst[d] = src[d];
  __syncwarp();
}

// acc[c] += weight * row[lane + 32 c] for the lane's columns below dim.
__device__ __forceinline__ void axpy_columns(float (&acc)[kExactColumns], float weight, const float* row, int dim,
                                             int lane) {
#pragma unroll
  for (int c = 0; c < kExactColumns; ++c) {
    if (lane + 32 * c < dim) acc[c] = fmaf(weight, row[lane + 32 * c], acc[c]);
  }
}

__device__ __forceinline__ void store_columns(const float (&acc)[kExactColumns], float factor, float* row, int dim,
                                              int lane) {
#pragma unroll
  for (int c = 0; c < kExactColumns; ++c) {
    if (lane + 32 * c < dim) row[lane + 32 * c] = acc[c] * factor;
  }
}

// Base-2 logit of (row = query, col = key), both inside the lengths; -inf where masked.
__device__ __forceinline__ float exact_logit2(float dot, int row, int col, const Problem& p, const Masks& masks,
                                              const MaskOffsets& masks_at) {
  if (p.causal && col > row) return -INFINITY;
  return dot * p.scale_log2 + masks_logit2<float>(masks, masks_at, row, col);
}

// dS = P (dP - delta) of (row, key) of one batch entry, from the query's and dO's rows in shared
// memory and the key's and value's rows k_row, v_row.
__device__ __forceinline__ float exact_score_grad(const float* q_row, const float* grad_out_row, const float* k_row,
                                                  const float* v_row, int row, int key, float lse2, float row_delta,
                                                  const Problem& p, const Masks& masks, const MaskOffsets& masks_at) {
  const float s = exact_logit2(dot_shared_global(q_row, k_row, p.dim_qk), row, key, p, masks, masks_at);
  const float prob = exp2f(s - lse2);
  return prob * (dot_shared_global(grad_out_row, v_row, p.dim_v) - row_delta);
}

__global__ void __launch_bounds__(32 * kExactWarps) attention_forward_exact_kernel(const ForwardArgs args) {
  VKERNELS_SHARED(float, q_rows, [kExactWarps][kMaxHeadDim]);
  const int num_m_blocks = ceil_div(args.p.len_q, kExactWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / num_m_blocks;
  const int row = static_cast<int>(blockIdx.x % num_m_blocks) * kExactWarps + warp;
  const Entry entry = batch_entry(args.p, bh), kv = kv_entry(args.p, entry);
  const Sequence sequence = sequence_of(args.p, entry);
  const Problem& p = sequence.p;
  if (row >= p.len_q) return;
  const float* k = at_entry<float>(args.k, kv, sequence.k_begin);
  const float* v = at_entry<float>(args.v, kv, sequence.k_begin);
  const MaskOffsets masks_at = mask_offsets(args.masks, entry);
  float* q_row = q_rows[warp];
  load_row_to_shared(q_row, at_entry<float>(args.q, entry, sequence.q_begin) + row * args.q.stride_row, p.dim_qk, lane);

  const int key_end = p.causal ? min(p.len_k, row + 1) : p.len_k;
  float acc[kExactColumns] = {};
  float row_max = -INFINITY, row_sum = 0.0f;
  for (int key0 = 0; key0 < key_end; key0 += 32) {
    const int key = key0 + lane;
    float s = -INFINITY;
    if (key < key_end) {
      s = exact_logit2(dot_shared_global(q_row, k + key * args.k.stride_row, p.dim_qk), row, key, p, args.masks,
                       masks_at);
    }
    const float new_max = fmaxf(row_max, warp_max(s));
    const float base = new_max == -INFINITY ? 0.0f : new_max;
    const float rescale = exp2f(row_max - base);
    const float prob = exp2f(s - base);
    row_max = new_max;
    row_sum = row_sum * rescale + warp_sum(prob);
#pragma unroll
    for (int c = 0; c < kExactColumns; ++c) acc[c] *= rescale;
    const int count = min(32, key_end - key0);
    for (int j = 0; j < count; ++j) {
      axpy_columns(acc, __shfl_sync(0xffffffffu, prob, j), v + (key0 + j) * args.v.stride_row, p.dim_v, lane);
    }
  }
  store_columns(acc, row_sum > 0.0f ? 1.0f / row_sum : 0.0f,
                at_entry<float>(args.out, entry, sequence.q_begin) + row * args.out.stride_row, p.dim_v, lane);
  if (lane == 0) {
    float* lse = at_entry<float>(args.lse, entry, sequence.q_begin);
    lse[row] = row_sum > 0.0f ? row_max * kLn2 + logf(row_sum) : INFINITY;
  }
}

__global__ void __launch_bounds__(32 * kExactWarps) attention_backward_query_exact_kernel(const BackwardArgs args) {
  VKERNELS_SHARED(float, q_rows, [kExactWarps][kMaxHeadDim]);
  VKERNELS_SHARED(float, grad_out_rows, [kExactWarps][kMaxHeadDim]);
  const int num_m_blocks = ceil_div(args.p.len_q, kExactWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / num_m_blocks;
  const int row = static_cast<int>(blockIdx.x % num_m_blocks) * kExactWarps + warp;
  const Entry entry = batch_entry(args.p, bh), kv = kv_entry(args.p, entry);
  const Sequence sequence = sequence_of(args.p, entry);
  const Problem& p = sequence.p;
  if (row >= p.len_q) return;
  const float* k = at_entry<float>(args.k, kv, sequence.k_begin);
  const float* v = at_entry<float>(args.v, kv, sequence.k_begin);
  const MaskOffsets masks_at = mask_offsets(args.masks, entry);
  float* q_row = q_rows[warp];
  float* grad_out_row = grad_out_rows[warp];
  load_row_to_shared(q_row, at_entry<float>(args.q, entry, sequence.q_begin) + row * args.q.stride_row, p.dim_qk, lane);
  load_row_to_shared(grad_out_row,
                     at_entry<float>(args.grad_out, entry, sequence.q_begin) + row * args.grad_out.stride_row, p.dim_v,
                     lane);
  const float lse2 = at_entry<float>(args.lse, entry, sequence.q_begin)[row] * kLog2e;
  const float row_delta = at_entry<float>(args.delta, entry, sequence.q_begin)[row];

  const int key_end = p.causal ? min(p.len_k, row + 1) : p.len_k;
  float acc[kExactColumns] = {};
  for (int key0 = 0; key0 < key_end; key0 += 32) {
    const int key = key0 + lane;
    float grad_score = 0.0f;
    if (key < key_end) {
      grad_score = exact_score_grad(q_row, grad_out_row, k + key * args.k.stride_row, v + key * args.v.stride_row, row,
                                    key, lse2, row_delta, p, args.masks, masks_at);
    }
    const int count = min(32, key_end - key0);
    for (int j = 0; j < count; ++j) {
      axpy_columns(acc, __shfl_sync(0xffffffffu, grad_score, j), k + (key0 + j) * args.k.stride_row, p.dim_qk, lane);
    }
  }
  store_columns(acc, p.scale, at_entry<float>(args.grad_q, entry, sequence.q_begin) + row * args.grad_q.stride_row,
                p.dim_qk, lane);
}

__global__ void __launch_bounds__(32 * kExactWarps) attention_backward_key_value_exact_kernel(const BackwardArgs args) {
  VKERNELS_SHARED(float, k_rows, [kExactWarps][kMaxHeadDim]);
  VKERNELS_SHARED(float, v_rows, [kExactWarps][kMaxHeadDim]);
  const int kv_heads = args.p.heads / args.p.kv_group;
  const int num_n_blocks = ceil_div(args.p.len_k, kExactWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / num_n_blocks;
  const int key = static_cast<int>(blockIdx.x % num_n_blocks) * kExactWarps + warp;
  const Entry entry = batch_entry(args.p, bh, kv_heads);  // a key/value head's
  const Sequence sequence = sequence_of(args.p, entry);
  const Problem& p = sequence.p;
  if (key >= p.len_k) return;
  const MaskOffsets masks_at = mask_offsets(args.masks, entry);  // (masks come with kv_group = 1)
  float* k_row = k_rows[warp];
  float* v_row = v_rows[warp];
  load_row_to_shared(k_row, at_entry<float>(args.k, entry, sequence.k_begin) + key * args.k.stride_row, p.dim_qk, lane);
  load_row_to_shared(v_row, at_entry<float>(args.v, entry, sequence.k_begin) + key * args.v.stride_row, p.dim_v, lane);

  const int query_begin = p.causal ? key : 0;  // causal: only queries at or after the key see it
  float acc_dk[kExactColumns] = {}, acc_dv[kExactColumns] = {};
  for (int head = 0; head < p.kv_group; ++head) {  // the group's query heads, in head order
    const Entry query_entry = {entry.i0, entry.i1, entry.i2 * p.kv_group + head};
    const float* q = at_entry<float>(args.q, query_entry, sequence.q_begin);
    const float* grad_out = at_entry<float>(args.grad_out, query_entry, sequence.q_begin);
    const float* lse = at_entry<float>(args.lse, query_entry, sequence.q_begin);
    const float* delta = at_entry<float>(args.delta, query_entry, sequence.q_begin);
    for (int query0 = query_begin; query0 < p.len_q; query0 += 32) {
      const int query = query0 + lane;
      float prob = 0.0f, grad_score = 0.0f;
      if (query < p.len_q) {
        const float s = exact_logit2(dot_shared_global(k_row, q + query * args.q.stride_row, p.dim_qk), query, key, p,
                                     args.masks, masks_at);
        prob = exp2f(s - lse[query] * kLog2e);
        const float grad_prob = dot_shared_global(v_row, grad_out + query * args.grad_out.stride_row, p.dim_v);
        grad_score = prob * (grad_prob - delta[query]);
      }
      const int count = min(32, p.len_q - query0);
      for (int j = 0; j < count; ++j) {
        const int other = query0 + j;
        axpy_columns(acc_dv, __shfl_sync(0xffffffffu, prob, j), grad_out + other * args.grad_out.stride_row, p.dim_v,
                     lane);
        axpy_columns(acc_dk, __shfl_sync(0xffffffffu, grad_score, j), q + other * args.q.stride_row, p.dim_qk, lane);
      }
    }
  }
  store_columns(acc_dk, p.scale, at_entry<float>(args.grad_k, entry, sequence.k_begin) + key * args.grad_k.stride_row,
                p.dim_qk, lane);
  store_columns(acc_dv, 1.0f, at_entry<float>(args.grad_v, entry, sequence.k_begin) + key * args.grad_v.stride_row,
                p.dim_v, lane);
}

// ---------------------------------------------------------------------------------------------
// Bias gradient: dS summed over the batch entries, rows and columns the bias broadcasts over
// ---------------------------------------------------------------------------------------------

// One block's (tensor cores) or one warp's (fp32) share of the bias gradient: bias tile
// (tile_m, tile_n) of the bias's batch entry `group` (index group_index), summed over chunk `chunk`.
struct BiasGradTask {
  Entry group;
  int group_index, chunk, tile_m, tile_n;
};

// (32-bit arithmetic: the host checks that the tasks fit, and 64-bit division costs a call and spills.)
__device__ __forceinline__ BiasGradTask bias_grad_task(const BiasGradSum& sum, int index, int tiles_m, int tiles_n) {
  BiasGradTask task;
  task.tile_n = index % tiles_n;
  index /= tiles_n;
  task.tile_m = index % tiles_m;
  index /= tiles_m;
  task.group_index = index % sum.groups;
  task.chunk = index / sum.groups;
  const int g = task.group_index;
  task.group = {g / (sum.kept1 * sum.kept2), (g / sum.kept2) % sum.kept1, g % sum.kept2};
  return task;
}

// The batch entry of term e of a bias entry's sum: on every level one of the two indices is 0
// (the bias keeps the level, or it sums over it).
__device__ __forceinline__ Entry summed_entry(const BiasGradSum& sum, const Entry& group, int e) {
  return {group.i0 + e / (sum.reduced1 * sum.reduced2), group.i1 + (e / sum.reduced2) % sum.reduced1,
          group.i2 + e % sum.reduced2};
}

__device__ __forceinline__ float* partial_sum_of(const BiasGradSum& sum, const BiasGradTask& task) {
  return sum.partial + (static_cast<int64_t>(task.chunk) * sum.groups + task.group_index) * sum.rows * sum.cols;
}

// Tensor cores: a block owns a kBlockM x kBlockN bias tile (every query block when the bias has one
// row, every key block when it has one column) and one chunk; each warp adds dS of its 16 rows of
// the tile in registers, entry after entry, then the tile is summed along the bias's reduced axes.
// kRotary: a template flag here (the other kernels test args.rotary at run time), since the rotation
// code pushed this kernel's registers into spills (sm_90 ptxas) also for calls without tables.
template <typename T, int HD, bool kRotary>
__global__ void __launch_bounds__(BiasGradTiles<HD>::kThreads)
    attention_bias_grad_kernel(const BackwardArgs args, const BiasGradSum sum) {
  using Tiles = BiasGradTiles<HD>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kWarps = Tiles::kWarps;
  constexpr int kLd = Tiles::kLd, kThreads = Tiles::kThreads;
  constexpr int kScoreTiles = kBlockN / 8;

  VKERNELS_DYNAMIC_SHARED(shared);
  T* const q_tile = reinterpret_cast<T*>(shared);
  T* const grad_out_tile = q_tile + kBlockM * kLd;
  T* const k_tile = grad_out_tile + kBlockM * kLd;
  T* const v_tile = k_tile + kBlockN * kLd;

  const Problem& p = args.p;
  const int m_blocks = ceil_div(p.len_q, kBlockM), n_blocks = ceil_div(p.len_k, kBlockN);
  const BiasGradTask task = bias_grad_task(sum, static_cast<int>(blockIdx.x), sum.reduce_rows ? 1 : m_blocks,
                                           sum.reduce_cols ? 1 : n_blocks);
  const int m_begin = sum.reduce_rows ? 0 : task.tile_m, m_end = sum.reduce_rows ? m_blocks : task.tile_m + 1;
  const int n_begin = sum.reduce_cols ? 0 : task.tile_n, n_end = sum.reduce_cols ? n_blocks : task.tile_n + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);

  const uint32_t q_addr = smem_u32(q_tile) + warp * 16 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t grad_out_addr = smem_u32(grad_out_tile) + warp * 16 * kLd * 2 + a_lane_offset<kLd>(lane);
  const uint32_t k_addr = smem_u32(k_tile) + b_lane_offset<kLd>(lane);
  const uint32_t v_addr = smem_u32(v_tile) + b_lane_offset<kLd>(lane);

  float acc[kScoreTiles][4] = {};
  const int e_end = min((task.chunk + 1) * sum.chunk_size, sum.num_entries);
  for (int e = task.chunk * sum.chunk_size; e < e_end; ++e) {
    const Entry entry = summed_entry(sum, task.group, e);
    const T* q = at_entry<T>(args.q, entry);
    const T* k = at_entry<T>(args.k, entry);
    const T* v = at_entry<T>(args.v, entry);
    const T* grad_out = at_entry<T>(args.grad_out, entry);
    const MaskOffsets masks_at = mask_offsets(args.masks, entry);
    for (int m_block = m_begin; m_block < m_end; ++m_block) {
      const int row_first = m_block * kBlockM + warp * 16;
      float lse2[2], row_delta[2];
      load_row_statistics(lse2, row_delta, at_entry<float>(args.lse, entry), at_entry<float>(args.delta, entry),
                          p.len_q, row_first, group);
      for (int n_block = n_begin; n_block < n_end; ++n_block) {
        __syncthreads();  // every warp is done reading the previous step's tiles
        if (n_block == n_begin) {
          load_tile_async<kBlockM, HD, kThreads>(q_tile, q, args.q.stride_row, m_block * kBlockM, p.len_q, p.dim_qk,
                                                 qk_cols);
          load_tile_async<kBlockM, HD, kThreads>(grad_out_tile, grad_out, args.grad_out.stride_row, m_block * kBlockM,
                                                 p.len_q, p.dim_v, v_cols);
        }
        load_tile_async<kBlockN, HD, kThreads>(k_tile, k, args.k.stride_row, n_block * kBlockN, p.len_k, p.dim_qk,
                                               qk_cols);
        load_tile_async<kBlockN, HD, kThreads>(v_tile, v, args.v.stride_row, n_block * kBlockN, p.len_k, p.dim_v,
                                               v_cols);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        if constexpr (kRotary) {
          const RotaryRows rows = rotary_rows(args.rotary, summed_entry(sum, task.group, e), 0);
          rotate_landed_tiles<kBlockM, kBlockN, HD, kThreads>(q_tile, k_tile, rows, rows, m_block * kBlockM,
                                                              n_block * kBlockN, p, n_block == n_begin);
        }

        float grad_s[kScoreTiles][4];
        score_grad_tile<T, HD, kBlockN, kLd, true>(grad_s, q_addr, grad_out_addr, k_addr, v_addr, row_first,
                                                   n_block * kBlockN, lse2, row_delta, p, args.masks, masks_at, lane);
#pragma unroll
        for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[nj][r] += grad_s[nj][r];
        }
      }
    }
  }

  float* partial = partial_sum_of(sum, task);
  const int row_first = m_begin * kBlockM + warp * 16, n0 = n_begin * kBlockN;
  if (!sum.reduce_rows && !sum.reduce_cols) {
#pragma unroll
    for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = row_first + group + 8 * (r / 2), col = n0 + nj * 8 + 2 * quad_lane + (r & 1);
        if (row < p.len_q && col < p.len_k) partial[static_cast<int64_t>(row) * sum.cols + col] = acc[nj][r];
      }
    }
  } else if (!sum.reduce_rows) {  // one column: each row summed over its keys
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float row_sum = 0.0f;
#pragma unroll
      for (int nj = 0; nj < kScoreTiles; ++nj) row_sum += acc[nj][2 * half] + acc[nj][2 * half + 1];
      row_sum = quad_sum(row_sum);
      const int row = row_first + group + 8 * half;
      if (quad_lane == 0 && row < p.len_q) partial[row] = row_sum;
    }
  } else {  // one row: each column summed over the warp's rows, then over the warps (in warp order)
    float column_sums[kScoreTiles][2];
#pragma unroll
    for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = acc[nj][e] + acc[nj][2 + e];
#pragma unroll
        for (int offset = 4; offset < 32; offset *= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
        column_sums[nj][e] = x;
      }
    }
    float* const warp_sums = reinterpret_cast<float*>(shared);  // [kWarps][kBlockN], over the Q tile
    __syncthreads();  // every warp is done reading the Q tile
    if (group == 0) {
#pragma unroll
      for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
        for (int e = 0; e < 2; ++e) warp_sums[warp * kBlockN + nj * 8 + 2 * quad_lane + e] = column_sums[nj][e];
      }
    }
    __syncthreads();
    if (warp == 0) {
      float total = 0.0f;
      for (int c = lane; c < kBlockN; c += 32) {
        float column = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) column += warp_sums[w * kBlockN + c];
        if (!sum.reduce_cols && n0 + c < p.len_k) partial[n0 + c] = column;
        total += column;
      }
      total = warp_sum(total);
      if (sum.reduce_cols && lane == 0) partial[0] = total;
    }
  }
}

// fp32: a warp owns 32 keys of one bias row (every row when the bias has one row, every key when it
// has one column; lane = key) and one chunk, and adds dS entry after entry.
__global__ void __launch_bounds__(32 * kExactWarps)
    attention_bias_grad_exact_kernel(const BackwardArgs args, const BiasGradSum sum) {
  VKERNELS_SHARED(float, q_rows, [kExactWarps][kMaxHeadDim]);
  VKERNELS_SHARED(float, grad_out_rows, [kExactWarps][kMaxHeadDim]);
  const Problem& p = args.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_blocks = ceil_div(p.len_k, 32);
  const int tiles_m = sum.reduce_rows ? 1 : p.len_q, tiles_n = sum.reduce_cols ? 1 : key_blocks;
  const int index = static_cast<int>(blockIdx.x) * kExactWarps + warp;
  if (index >= sum.chunks * sum.groups * tiles_m * tiles_n) return;
  const BiasGradTask task = bias_grad_task(sum, index, tiles_m, tiles_n);
  const int row_begin = sum.reduce_rows ? 0 : task.tile_m, row_end = sum.reduce_rows ? p.len_q : task.tile_m + 1;
  const int block_begin = sum.reduce_cols ? 0 : task.tile_n, block_end = sum.reduce_cols ? key_blocks : task.tile_n + 1;
  float* q_row = q_rows[warp];
  float* grad_out_row = grad_out_rows[warp];

  float acc = 0.0f;
  const int e_end = min((task.chunk + 1) * sum.chunk_size, sum.num_entries);
  for (int e = task.chunk * sum.chunk_size; e < e_end; ++e) {
    const Entry entry = summed_entry(sum, task.group, e);
    const float* lse = at_entry<float>(args.lse, entry);
    const float* delta = at_entry<float>(args.delta, entry);
    const float* q = at_entry<float>(args.q, entry);
    const float* k = at_entry<float>(args.k, entry);
    const float* v = at_entry<float>(args.v, entry);
    const float* grad_out = at_entry<float>(args.grad_out, entry);
    const MaskOffsets masks_at = mask_offsets(args.masks, entry);
    for (int row = row_begin; row < row_end; ++row) {
      __syncwarp();  // every lane is done reading the previous row
      load_row_to_shared(q_row, q + row * args.q.stride_row, p.dim_qk, lane);
      load_row_to_shared(grad_out_row, grad_out + row * args.grad_out.stride_row, p.dim_v, lane);
      const float lse2 = lse[row] * kLog2e;
      const float row_delta = delta[row];
      for (int block = block_begin; block < block_end; ++block) {
        const int key = block * 32 + lane;
        if (key < p.len_k) {
          acc += exact_score_grad(q_row, grad_out_row, k + key * args.k.stride_row, v + key * args.v.stride_row, row,
                                  key, lse2, row_delta, p, args.masks, masks_at);
        }
      }
    }
  }

  float* partial = partial_sum_of(sum, task) + static_cast<int64_t>(sum.reduce_rows ? 0 : task.tile_m) * sum.cols;
  if (sum.reduce_cols) {
    acc = warp_sum(acc);
    if (lane == 0) partial[0] = acc;
  } else if (task.tile_n * 32 + lane < p.len_k) {
    partial[task.tile_n * 32 + lane] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, int threads, size_t smem_bytes, const Args&... args) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention_cuda: too many blocks (", blocks,
              "); split the batch");
  if (smem_bytes > 48 * 1024) {
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem_bytes <= static_cast<size_t>(limit), "attention_cuda: this head dim needs ", smem_bytes,
                " bytes of shared memory per block, the GPU allows ", limit);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  }
  launch_kernel(kernel, static_cast<unsigned>(blocks), threads, smem_bytes, c10::cuda::getCurrentCUDAStream(), args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn with the head-dim class (a std::integral_constant) that holds `dim`.
template <typename Fn>
void dispatch_head_dim_class(int dim, Fn&& fn) {
  if (dim <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else if (dim <= 64) {
    fn(std::integral_constant<int, 64>{});
  } else if (dim <= 128) {
    fn(std::integral_constant<int, 128>{});
  } else {
    fn(std::integral_constant<int, 256>{});
  }
}

template <typename Fn>
void dispatch_bool(bool value, Fn&& fn) {
  if (value) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// A (B, H, L, X) operand as (1, B, H, L, X); a (B0, B1, H, L, X) one unchanged.
at::Tensor five_dims(const at::Tensor& t) { return t.dim() == 5 ? t : t.unsqueeze(0); }

// A (B, H, L) row statistic (lse, delta) as (1, B, H, L); a (B0, B1, H, L) one unchanged.
at::Tensor four_dims(const at::Tensor& t) { return t.dim() == 4 ? t : t.unsqueeze(0); }

// A 5-D result as the query's rank.
at::Tensor like_query(const at::Tensor& t, const at::Tensor& query) { return query.dim() == 5 ? t : t.squeeze(0); }

Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
Output output(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// q, k, v (and out, dO) as the kernels read them: 5-D with a unit stride along the head dim, and for
// the tensor cores (cp.async moves 16-byte chunks) a data pointer and strides that are multiples of
// 16 bytes. Views that break this (rare: transposed heads, odd storage offsets or row strides) are copied.
at::Tensor readable_operand(const at::Tensor& t, bool tensor_cores) {
  bool readable = t.stride(-1) == 1;
  if (tensor_cores) {
    readable = readable && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int d = 0; d + 1 < t.dim(); ++d) {
      readable = readable && (t.size(d) == 1 || (t.stride(d) * t.element_size()) % 16 == 0);
    }
  }
  return readable ? t : t.contiguous();
}
at::Tensor kernel_operand(const at::Tensor& t, bool tensor_cores) {
  return five_dims(readable_operand(t, tensor_cores));
}

// A packed (total, H, X) tensor, an (H, total) row statistic or a (total, [H,] R) rotary table as the
// kernels' (1, batch, H, total, .) view: every sequence reads the same rows (stride 0 over B1) from
// its first token on (Problem::cu_seqlens_q / _k), tables shared by the heads with stride 0 over H.
at::Tensor packed_view(const at::Tensor& t, int64_t batch, int64_t heads, bool statistic = false) {
  at::Tensor heads_first = statistic ? t : (t.dim() == 3 ? t.transpose(0, 1) : t.unsqueeze(0));
  std::vector<int64_t> shape = heads_first.sizes().vec();
  shape[0] = heads;
  shape.insert(shape.begin(), {1, batch});
  return heads_first.unsqueeze(0).unsqueeze(0).expand(shape);
}

void check_same_device(const at::Tensor& t, const at::Tensor& query, const char* name) {
  TORCH_CHECK(t.device() == query.device(), "attention_cuda: ", name, " is on ", t.device(), " but query is on ",
              query.device());
}

// The (B0, B1, H, Lq, Lk) shape the mask and the bias broadcast to.
std::vector<int64_t> scores_shape(const at::Tensor& query, const at::Tensor& key) {
  const at::Tensor q = five_dims(query);
  return {q.size(0), q.size(1), q.size(2), q.size(3), key.size(-2)};
}

void check_mask(const std::optional<at::Tensor>& mask, const char* name, bool may_be_bool, const at::Tensor& query,
                const at::Tensor& key) {
  if (!mask.has_value()) return;
  check_same_device(*mask, query, name);
  const auto dtype = mask->scalar_type(), query_dtype = query.scalar_type();
  TORCH_CHECK((may_be_bool && dtype == at::kBool) || dtype == at::kFloat || dtype == query_dtype, "attention_cuda: ",
              name, " must be ", may_be_bool ? "bool, " : "", "float32 or the query dtype (", query_dtype, "), got ",
              dtype);
  const std::vector<int64_t> scores = scores_shape(query, key);
  TORCH_CHECK(mask->dim() <= 5 && at::is_expandable_to(mask->sizes(), scores), "attention_cuda: ", name,
              " of shape ", mask->sizes(), " does not broadcast to (B0, B1, H, Lq, Lk) = ", at::IntArrayRef(scores));
}

// cos and sin: both or neither, of one shape, floating point, on the query's device, R = their last dim
// even and at most the head dim. The dK/dV kernels of head dims above 128 accumulate 128-column slices:
// rotate-half pairs (c, c + R/2) then stay inside one for R <= 128 only.
void check_rotary_tables(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                         const at::Tensor& query) {
  TORCH_CHECK(cos.has_value() && sin.has_value(), "attention_cuda: rotary_cos and rotary_sin come together");
  check_same_device(*cos, query, "rotary_cos");
  check_same_device(*sin, query, "rotary_sin");
  TORCH_CHECK(cos->sizes() == sin->sizes(), "attention_cuda: rotary cos and sin differ in shape: ", cos->sizes(),
              " and ", sin->sizes());
  TORCH_CHECK(cos->is_floating_point() && sin->is_floating_point() && cos->dim() >= 2,
              "attention_cuda: rotary tables must be floating point, (..., L, R), got ", cos->scalar_type(), " ",
              cos->sizes());
  const int64_t rotary_dim = cos->size(-1), head_dim = query.size(-1);
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "attention_cuda: rotary_dim (the tables' last dim) must be even and in 2..", head_dim,
              " (the head dim), got ", rotary_dim);
}

// Rotary tables as the kernels read them: float32 with a unit column stride (broadcast views keep
// their stride-0 dims).
at::Tensor float_table(const at::Tensor& t) {
  const at::Tensor table = t.to(at::kFloat);
  return table.stride(-1) == 1 ? table : table.contiguous();
}

// cos and sin as views of shape `shape` ((B0, B1, H, L, R), or packed (1, batch, H, total, R)).
Rotary rotary_of(const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  return {operand(cos), operand(sin), static_cast<int>(cos.size(-1)), interleaved};
}

constexpr Rotary kNoRotary = {{nullptr, 0, 0, 0, 0}, {nullptr, 0, 0, 0, 0}, 0, false};

// x (..., D) with its first R columns rotated by cos and sin (..., R) broadcasting against it, or
// (inverse) a gradient of rotated columns un-rotated: rotated_column's formulas in ATen, for the fp32
// kernels (the exact path; the tensor-core kernels rotate inside).
at::Tensor rotated_columns(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                           bool inverse) {
  const int64_t rotary_dim = cos.size(-1);
  const at::TensorOptions indices = x.options().dtype(at::kLong);
  const at::Tensor first = interleaved ? at::arange(0, rotary_dim, 2, indices) : at::arange(0, rotary_dim / 2, indices);
  const at::Tensor second = first + (interleaved ? 1 : rotary_dim / 2);
  const at::Tensor x_a = x.index_select(-1, first), x_b = x.index_select(-1, second);
  const at::Tensor cos_a = cos.index_select(-1, first), cos_b = cos.index_select(-1, second);
  const at::Tensor sin_a = sin.index_select(-1, first), sin_b = sin.index_select(-1, second);
  at::Tensor y = x.contiguous().clone();
  y.index_copy_(-1, first, inverse ? x_a * cos_a + x_b * sin_b : x_a * cos_a - x_b * sin_a);
  y.index_copy_(-1, second, inverse ? x_b * cos_b - x_a * sin_a : x_b * cos_b + x_a * sin_b);
  return y;
}

// Checks query/key/value/mask/bias and fills the problem description.
Problem check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
                     bool is_causal, double scale, const std::optional<at::Tensor>& rotary_cos,
                     const std::optional<at::Tensor>& rotary_sin) {
  TORCH_CHECK(on_kernel_device(query), "attention_cuda: query must be a ", kKernelDevice, " tensor, got one on ",
              query.device());
  check_same_device(key, query, "key");
  check_same_device(value, query, "value");
  const int64_t rank = query.dim();
  TORCH_CHECK((rank == 4 || rank == 5) && key.dim() == rank && value.dim() == rank,
              "attention_cuda: query, key and value must be 5-D (B0, B1, heads, length, head_dim) or 4-D (batch, "
              "heads, length, head_dim), got shapes ",
              query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "attention_cuda: query must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype,
              "attention_cuda: query, key and value must share a dtype, got ", dtype, ", ", key.scalar_type(), ", ",
              value.scalar_type());
  const at::IntArrayRef batch = query.sizes().slice(0, rank - 2);
  TORCH_CHECK(key.sizes().slice(0, rank - 2) == batch && value.sizes().slice(0, rank - 2) == batch,
              "attention_cuda: batch dims of query ", query.sizes(), ", key ", key.sizes(), " and value ",
              value.sizes(), " must match");
  TORCH_CHECK(key.size(-2) == value.size(-2), "attention_cuda: key ", key.sizes(), " and value ", value.sizes(),
              " must have the same length");
  TORCH_CHECK(key.size(-1) == query.size(-1), "attention_cuda: query ", query.sizes(), " and key ", key.sizes(),
              " must have the same head dim");
  for (const at::Tensor* t : {&query, &value}) {
    const int64_t dim = t->size(-1);
    TORCH_CHECK(dim >= 8 && dim <= kMaxHeadDim && dim % 8 == 0,
                "attention_cuda: head dims must be multiples of 8 in [8, 256], got ", dim);
  }
  const std::vector<int64_t> scores = scores_shape(query, key);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(scores[0] * scores[1] * scores[2] <= kIntMax && scores[3] <= kIntMax && scores[4] <= kIntMax,
              "attention_cuda: sizes must fit in 32 bits, got ", query.sizes(), " and ", key.sizes());
  check_mask(attn_mask, "attn_mask", true, query, key);
  check_mask(attn_bias, "attn_bias", false, query, key);
  if (rotary_cos.has_value() || rotary_sin.has_value()) {
    TORCH_CHECK(query.size(-2) == key.size(-2), "attention_cuda: rotary tables need query and key of one length, got ",
                query.size(-2), " and ", key.size(-2));
    check_rotary_tables(rotary_cos, rotary_sin, query);
    std::vector<int64_t> tables = scores_shape(query, key);
    tables.back() = rotary_cos->size(-1);
    TORCH_CHECK(rotary_cos->dim() <= 5 && at::is_expandable_to(rotary_cos->sizes(), tables),
                "attention_cuda: rotary tables of shape ", rotary_cos->sizes(),
                " do not broadcast to (B0, B1, H, L, R) = ", at::IntArrayRef(tables));
  }
  Problem p;
  p.batch1 = static_cast<int>(scores[1]);
  p.heads = static_cast<int>(scores[2]);
  p.len_q = static_cast<int>(scores[3]);
  p.len_k = static_cast<int>(scores[4]);
  p.dim_qk = static_cast<int>(query.size(-1));
  p.dim_v = static_cast<int>(value.size(-1));
  p.kv_group = 1;
  p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
  p.causal = is_causal;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

// A mask or bias read through a stride-0 view of its broadcast to the scores' shape.
Mask mask_of(const std::optional<at::Tensor>& attn_mask, const std::vector<int64_t>& scores, at::ScalarType dtype) {
  if (!attn_mask.has_value()) return {nullptr, 0, 0, 0, 0, 0, kMaskBool};
  at::Tensor m = *attn_mask;
  while (m.dim() < 5) m = m.unsqueeze(0);
  m = m.expand(scores);
  const int kind = m.scalar_type() == at::kBool ? kMaskBool : m.scalar_type() == dtype ? kMaskSameDtype : kMaskFloat;
  return {m.data_ptr(), m.stride(0), m.stride(1), m.stride(2), m.stride(3), m.stride(4), kind};
}

Masks masks_of(const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
               const at::Tensor& query, const at::Tensor& key) {
  const std::vector<int64_t> scores = scores_shape(query, key);
  return {mask_of(attn_mask, scores, query.scalar_type()), mask_of(attn_bias, scores, query.scalar_type())};
}

void check_tensor_core_device(const at::Tensor& query) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, query.device().index()));
  TORCH_CHECK(major >= 8, "attention_cuda: float16/bfloat16 need a GPU of compute capability 8.0 or newer");
}

// The dK/dV kernels of head dims above 128 accumulate 128-column slices: rotate-half pairs (c, c + R/2)
// stay inside one for R <= 128 only.
void check_rotary_slices(const Problem& p, int64_t rotary_dim, bool interleaved) {
  TORCH_CHECK(interleaved || rotary_dim <= 128 || std::max(p.dim_qk, p.dim_v) <= 128,
              "attention_cuda: rotate-half tables of more than 128 columns need head dims of at most 128, got "
              "rotary_dim ", rotary_dim, " and head dims ", p.dim_qk, ", ", p.dim_v);
}

// The operands and tables the kernels read: q and k rotated first on the fp32 path (through
// rotated_columns), the tables passed on to the tensor-core kernels. cos and sin: views broadcast to the
// kernels' (B0, B1, H, L, R) shape (query_tables) and, for the fp32 rotation, against q and k (`tables`).
struct RotaryOperands {
  at::Tensor query, key;
  Rotary rotary;
};

RotaryOperands rotary_operands(const at::Tensor& query, const at::Tensor& key, bool tensor_cores,
                               const std::optional<std::pair<at::Tensor, at::Tensor>>& kernel_tables,
                               const std::optional<std::pair<at::Tensor, at::Tensor>>& tables, bool interleaved) {
  if (!kernel_tables.has_value()) return {query, key, kNoRotary};
  if (tensor_cores) return {query, key, rotary_of(kernel_tables->first, kernel_tables->second, interleaved)};
  return {rotated_columns(query, tables->first, tables->second, interleaved, false),
          rotated_columns(key, tables->first, tables->second, interleaved, false), kNoRotary};
}

// Forward kernels over `entries` query batch entries of up to p.len_q queries each.
void launch_forward(const ForwardArgs& args, int64_t entries, at::ScalarType dtype, bool has_masks) {
  const Problem& p = args.p;
  dispatch_dtype(dtype, "attention_cuda", [&](auto element) {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, float>) {
      launch(attention_forward_exact_kernel, ceil_div(p.len_q, kExactWarps) * entries, 32 * kExactWarps, 0, args);
    } else {
      dispatch_head_dim_class(std::max(p.dim_qk, p.dim_v), [&](auto head_dim) {
        constexpr int HD = decltype(head_dim)::value;
        using Tiles = ForwardTiles<HD>;
        dispatch_bool(has_masks, [&](auto masks) {
          launch(attention_forward_kernel<T, HD, decltype(masks)::value>, ceil_div(p.len_q, Tiles::kBlockM) * entries,
                 Tiles::kThreads, Tiles::kSmemBytes, args);
        });
      });
    }
  });
}

// The dense tables: cos and sin broadcast to (B0, B1, H, L, R).
std::optional<std::pair<at::Tensor, at::Tensor>> dense_tables(const std::optional<at::Tensor>& cos,
                                                              const std::optional<at::Tensor>& sin,
                                                              const at::Tensor& query, const at::Tensor& key) {
  if (!cos.has_value()) return std::nullopt;
  std::vector<int64_t> shape = scores_shape(query, key);
  shape.back() = cos->size(-1);
  auto broadcast = [&](const at::Tensor& t) {
    at::Tensor table = float_table(t);
    while (table.dim() < 5) table = table.unsqueeze(0);
    return table.expand(shape);
  };
  return std::make_pair(broadcast(*cos), broadcast(*sin));
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                  const std::optional<at::Tensor>& attn_bias, bool is_causal,
                                                  double scale, const std::optional<at::Tensor>& rotary_cos,
                                                  const std::optional<at::Tensor>& rotary_sin,
                                                  bool rotary_interleaved) {
  const Problem p = check_inputs(query, key, value, attn_mask, attn_bias, is_causal, scale, rotary_cos, rotary_sin);
  if (rotary_cos.has_value()) check_rotary_slices(p, rotary_cos->size(-1), rotary_interleaved);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch0 = five_dims(query).size(0);
  const int64_t batch_heads = batch0 * p.batch1 * p.heads;
  // laid out (B0, B1, Lq, H, Dv): vkernels.shapes.empty_attention_output
  at::Tensor out = at::empty({batch0, p.batch1, p.len_q, p.heads, p.dim_v}, query.options()).transpose(2, 3);
  at::Tensor lse = at::empty({batch0, p.batch1, p.heads, p.len_q}, query.options().dtype(at::kFloat));
  if (batch_heads * p.len_q == 0) return {like_query(out, query), like_query(lse, query)};

  const bool tensor_cores = query.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(query);
  const auto tables = dense_tables(rotary_cos, rotary_sin, query, key);
  const RotaryOperands rotated =
      rotary_operands(five_dims(query), five_dims(key), tensor_cores, tables, tables, rotary_interleaved);
  const at::Tensor q = kernel_operand(rotated.query, tensor_cores), k = kernel_operand(rotated.key, tensor_cores);
  const at::Tensor v = kernel_operand(value, tensor_cores);
  const ForwardArgs args{operand(q),  operand(k),     operand(v),  masks_of(attn_mask, attn_bias, query, key),
                         p,           rotated.rotary, output(out), output(lse)};
  launch_forward(args, batch_heads, query.scalar_type(), attn_mask.has_value() || attn_bias.has_value());
  return {like_query(out, query), like_query(lse, query)};
}

void check_same_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "attention_backward_cuda: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Programs the bias gradient aims for, a few per SM of an H100/H200 (132 SMs): the Triton backend's
// BIAS_GRAD_PROGRAMS, so that both split the sum alike.
constexpr int64_t kBiasGradPrograms = 1024;

// (chunk_size, chunks): the batch entries a bias element sums over, split into consecutive chunks
// summed separately and then added in chunk order; from the shapes only (bias_tiles counts the
// bias's 64 x 64 tiles), as the Triton backend's bias_grad_chunks.
std::pair<int64_t, int64_t> bias_grad_chunks(int64_t num_entries, int64_t bias_tiles) {
  const int64_t wanted =
      std::max<int64_t>(1, std::min(num_entries, kBiasGradPrograms / std::max<int64_t>(1, bias_tiles)));
  const int64_t chunk_size = (num_entries + wanted - 1) / wanted;
  return {chunk_size, (num_entries + chunk_size - 1) / chunk_size};
}

// dS summed over what the bias broadcasts over, in the bias's dtype: per bias entry, its batch
// entries in bias_grad_chunks, summed by the kernels into float32 partial sums then added in chunk order.
at::Tensor bias_grad(const BackwardArgs& args, const at::Tensor& bias, int64_t batch0, at::ScalarType dtype) {
  const Problem& p = args.p;
  at::Tensor bias5 = bias;
  while (bias5.dim() < 5) bias5 = bias5.unsqueeze(0);
  const int64_t kept0 = bias5.size(0), kept1 = bias5.size(1), kept2 = bias5.size(2);
  const int64_t rows = bias5.size(3), cols = bias5.size(4);
  const int64_t reduced0 = batch0 / kept0, reduced1 = p.batch1 / kept1, reduced2 = p.heads / kept2;
  const int64_t groups = kept0 * kept1 * kept2, num_entries = reduced0 * reduced1 * reduced2;
  const int64_t bias_tiles = groups * ((rows + 63) / 64) * ((cols + 63) / 64);
  const std::pair<int64_t, int64_t> split = bias_grad_chunks(num_entries, bias_tiles);
  const int64_t chunk_size = split.first, chunks = split.second;
  at::Tensor partial = at::empty({chunks, groups, rows, cols}, bias.options().dtype(at::kFloat));
  const BiasGradSum sum{partial.data_ptr<float>(),
                        static_cast<int>(kept1),
                        static_cast<int>(kept2),
                        static_cast<int>(groups),
                        static_cast<int>(reduced1),
                        static_cast<int>(reduced2),
                        static_cast<int>(num_entries),
                        static_cast<int>(chunk_size),
                        static_cast<int>(chunks),
                        static_cast<int>(rows),
                        static_cast<int>(cols),
                        rows == 1 && p.len_q > 1,
                        cols == 1 && p.len_k > 1};

  dispatch_dtype(dtype, "attention_backward_cuda", [&](auto element) {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, float>) {
      const int64_t warps = chunks * groups * (sum.reduce_rows ? 1 : p.len_q) *
                            (sum.reduce_cols ? 1 : ceil_div(p.len_k, 32));
      TORCH_CHECK(warps <= std::numeric_limits<int32_t>::max(), "attention_backward_cuda: the bias gradient needs ",
                  warps, " warps, more than 2**31; split the batch");
      launch(attention_bias_grad_exact_kernel, (warps + kExactWarps - 1) / kExactWarps, 32 * kExactWarps, 0, args,
             sum);
    } else {
      dispatch_head_dim_class(std::max(p.dim_qk, p.dim_v), [&](auto head_dim) {
        constexpr int HD = decltype(head_dim)::value;
        using Tiles = BiasGradTiles<HD>;
        const int64_t blocks = chunks * groups * (sum.reduce_rows ? 1 : ceil_div(p.len_q, Tiles::kBlockM)) *
                               (sum.reduce_cols ? 1 : ceil_div(p.len_k, Tiles::kBlockN));
        dispatch_bool(args.rotary.dim > 0, [&](auto rotary) {
          launch(attention_bias_grad_kernel<T, HD, decltype(rotary)::value>, blocks, Tiles::kThreads, Tiles::kSmemBytes,
                 args, sum);
        });
      });
    }
  });
  const at::Tensor total = chunks == 1 ? partial[0] : partial.sum(0);
  return total.to(bias.scalar_type()).view(bias.sizes());
}

// The delta, dK/dV and dQ kernels over `entries` query batch entries (B0 B1 H; the key/value ones are
// entries / kv_group); delta_args (rows of them) may view the query rows otherwise (packed batches).
void launch_backward(const BackwardArgs& args, const BackwardArgs& delta_args, int64_t rows, int64_t entries,
                     at::ScalarType dtype, bool has_masks) {
  const Problem& p = args.p;
  const int64_t kv_entries = entries / p.kv_group;
  dispatch_dtype(dtype, "attention_backward_cuda", [&](auto element) {
    using T = decltype(element);
    launch(attention_backward_delta_kernel<T>, (rows + 7) / 8, 256, 0, delta_args, rows);
    if constexpr (std::is_same_v<T, float>) {
      launch(attention_backward_key_value_exact_kernel, ceil_div(p.len_k, kExactWarps) * kv_entries, 32 * kExactWarps,
             0, args);
      launch(attention_backward_query_exact_kernel, ceil_div(p.len_q, kExactWarps) * entries, 32 * kExactWarps, 0,
             args);
    } else {
      dispatch_head_dim_class(std::max(p.dim_qk, p.dim_v), [&](auto head_dim) {
        constexpr int HD = decltype(head_dim)::value;
        using KeyValue = KeyValueGradTiles<HD>;
        using Query = QueryGradTiles<HD>;
        const int64_t slices = ceil_div(std::max(p.dim_qk, p.dim_v), KeyValue::kSliceDim);
        dispatch_bool(has_masks, [&](auto masks) {
          constexpr bool kHasMasks = decltype(masks)::value;
          launch(attention_backward_key_value_kernel<T, HD, kHasMasks>,
                 ceil_div(p.len_k, KeyValue::kBlockN) * slices * kv_entries, KeyValue::kThreads, KeyValue::kSmemBytes,
                 args);
          launch(attention_backward_query_kernel<T, HD, kHasMasks>, ceil_div(p.len_q, Query::kBlockM) * entries,
                 Query::kThreads, Query::kSmemBytes, args);
        });
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& attn_bias, bool is_causal, double scale, bool bias_requires_grad,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved) {
  const Problem p = check_inputs(query, key, value, attn_mask, attn_bias, is_causal, scale, rotary_cos, rotary_sin);
  if (rotary_cos.has_value()) check_rotary_slices(p, rotary_cos->size(-1), rotary_interleaved);
  check_same_device(grad_out, query, "grad_out");
  check_same_device(out, query, "out");
  check_same_device(lse, query, "lse");
  TORCH_CHECK(attn_bias.has_value() || !bias_requires_grad,
              "attention_backward_cuda: bias_requires_grad=True without an attn_bias");
  std::vector<int64_t> out_shape = query.sizes().vec();
  out_shape.back() = p.dim_v;
  check_same_shape(grad_out, out_shape, "grad_out");
  check_same_shape(out, out_shape, "out");
  check_same_shape(lse, query.sizes().slice(0, query.dim() - 1), "lse");
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "attention_backward_cuda: grad_out and out must have the query dtype ", query.scalar_type(), ", got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "attention_backward_cuda: lse must be float32, got ",
              lse.scalar_type());

  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_q = at::empty(query.sizes(), query.options());
  at::Tensor grad_k = at::empty(key.sizes(), key.options());
  at::Tensor grad_v = at::empty(value.sizes(), value.options());
  std::optional<at::Tensor> grad_bias;
  if (bias_requires_grad) grad_bias = at::zeros(attn_bias->sizes(), attn_bias->options());
  const int64_t batch0 = five_dims(query).size(0);
  const int64_t batch_heads = batch0 * p.batch1 * p.heads;
  if (batch_heads == 0) return {grad_q, grad_k, grad_v, grad_bias};

  const bool tensor_cores = query.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(query);
  const auto tables = dense_tables(rotary_cos, rotary_sin, query, key);
  const RotaryOperands rotated =
      rotary_operands(five_dims(query), five_dims(key), tensor_cores, tables, tables, rotary_interleaved);
  const at::Tensor q = kernel_operand(rotated.query, tensor_cores), k = kernel_operand(rotated.key, tensor_cores);
  const at::Tensor v = kernel_operand(value, tensor_cores);
  // Autograd may hand over an expanded gradient (e.g. of a sum): it is copied then. out is read by
  // the delta kernel only, element by element.
  const at::Tensor dout = kernel_operand(grad_out, tensor_cores), out_rows = kernel_operand(out, false);
  const at::Tensor lse_rows = lse.contiguous();
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const BackwardArgs args{operand(q), operand(k), operand(v), operand(out_rows), operand(dout),
                          masks_of(attn_mask, attn_bias, query, key), p, rotated.rotary,
                          operand(four_dims(lse_rows)), output(four_dims(delta)),
                          output(five_dims(grad_q)), output(five_dims(grad_k)), output(five_dims(grad_v))};
  launch_backward(args, args, batch_heads * p.len_q, batch_heads, query.scalar_type(),
                  attn_mask.has_value() || attn_bias.has_value());
  if (bias_requires_grad && p.len_q > 0 && p.len_k > 0) {
    grad_bias = bias_grad(args, *attn_bias, batch0, query.scalar_type());
  }
  if (tables.has_value() && !tensor_cores) {  // the fp32 kernels' dq and dk are of the rotated q and k
    auto unrotated = [&](const at::Tensor& grad) {
      const at::Tensor rotated_back =
          rotated_columns(five_dims(grad), tables->first, tables->second, rotary_interleaved, true);
      return like_query(rotated_back, query);
    };
    grad_q = unrotated(grad_q);
    grad_k = unrotated(grad_k);
  }
  return {grad_q, grad_k, grad_v, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// Packed variable-length batches (varlen_attention)
// ---------------------------------------------------------------------------------------------

// cu_seqlens' values, as vkernels.shapes.packed_sequence_bounds checks them (same messages): each
// starts at 0, never decreases, ends at its total, and no sequence is longer than its max_seqlen.
void check_packed_bounds(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                         int64_t total_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const struct {
    const char* name;
    at::Tensor values;
    int64_t total, longest;
  } bounds[] = {{"cu_seqlens_q", cu_seqlens_q.to(at::kCPU).to(at::kLong), total_q, max_seqlen_q},
                {"cu_seqlens_k", cu_seqlens_k.to(at::kCPU).to(at::kLong), total_k, max_seqlen_k}};
  for (const auto& b : bounds) {
    const int64_t* v = b.values.data_ptr<int64_t>();
    const int64_t n = b.values.numel();
    TORCH_CHECK_VALUE(v[0] == 0, "varlen_attention: ", b.name, " must start at 0, got ", v[0]);
    int64_t longest = 0;
    for (int64_t i = 1; i < n; ++i) {
      if (v[i] < v[i - 1]) {
        std::string values = "[";
        for (int64_t j = 0; j < n; ++j) values += (j ? ", " : "") + std::to_string(v[j]);
        TORCH_CHECK_VALUE(false, "varlen_attention: ", b.name, " decreases (at entry ", i, "): ", values, "]");
      }
      longest = std::max(longest, v[i] - v[i - 1]);
    }
    TORCH_CHECK_VALUE(v[n - 1] == b.total, "varlen_attention: ", b.name, " must end at the total token count ",
                      b.total, ", got ", v[n - 1]);
    TORCH_CHECK_VALUE(longest <= b.longest, "varlen_attention: max_seqlen_", b.name[11], " = ", b.longest,
                      " is smaller than a sequence of ", longest, " tokens");
  }
}

// Checks a packed batch's inputs (cu_seqlens' values included) and fills the problem description.
Problem check_packed_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, bool is_causal, double scale,
                            const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
                            bool rotary_interleaved) {
  TORCH_CHECK(on_kernel_device(query), "varlen_attention_cuda: query must be a ", kKernelDevice,
              " tensor, got one on ", query.device());
  for (const auto& [t, name] : {std::pair{&key, "key"}, {&value, "value"}, {&cu_seqlens_q, "cu_seqlens_q"},
                                {&cu_seqlens_k, "cu_seqlens_k"}}) {
    check_same_device(*t, query, name);
  }
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "varlen_attention_cuda: query, key and value must be (total, heads, head_dim), got shapes ",
              query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat) && key.scalar_type() == dtype &&
                  value.scalar_type() == dtype,
              "varlen_attention_cuda: query, key and value must share a dtype of float16, bfloat16 or float32, got ",
              dtype, ", ", key.scalar_type(), ", ", value.scalar_type());
  const int64_t heads = query.size(1), kv_heads = key.size(1);
  TORCH_CHECK(key.size(0) == value.size(0) && kv_heads == value.size(1) && key.size(2) == query.size(2),
              "varlen_attention_cuda: query ", query.sizes(), ", key ", key.sizes(), " and value ", value.sizes(),
              " do not fit (key and value: one token count and head count, query and key: one head dim)");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "varlen_attention_cuda: query heads (", heads,
              ") must be a multiple of key/value heads (", kv_heads, ")");
  for (const at::Tensor* t : {&query, &value}) {
    const int64_t dim = t->size(-1);
    TORCH_CHECK(dim >= 8 && dim <= kMaxHeadDim && dim % 8 == 0,
                "varlen_attention_cuda: head dims must be multiples of 8 in [8, 256], got ", dim);
  }
  for (const at::Tensor* t : {&cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() >= 1 && t->is_contiguous(),
                "varlen_attention_cuda: cu_seqlens must be contiguous 1-D int32 tensors of batch + 1 >= 1 entries, "
                "got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
                    "varlen_attention: cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got ",
                    cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(query.size(0) * heads <= kIntMax && key.size(0) * kv_heads <= kIntMax && max_seqlen_q >= 0 &&
                  max_seqlen_k >= 0 && max_seqlen_q <= kIntMax && max_seqlen_k <= kIntMax,
              "varlen_attention_cuda: sizes must fit in 32 bits and max_seqlen be non-negative, got ", query.sizes(),
              ", ", key.sizes(), ", max_seqlen ", max_seqlen_q, ", ", max_seqlen_k);
  if (rotary_cos.has_value() || rotary_sin.has_value()) {
    check_rotary_tables(rotary_cos, rotary_sin, query);
    const at::Tensor& cos = *rotary_cos;
    TORCH_CHECK(query.size(0) == key.size(0), "varlen_attention_cuda: rotary tables need as many key tokens as query "
                "tokens, got ", query.size(0), " and ", key.size(0));
    TORCH_CHECK((cos.dim() == 2 || (cos.dim() == 3 && cos.size(1) == heads)) && cos.size(0) == query.size(0),
                "varlen_attention_cuda: rotary tables must be (total, R) or (total, heads, R), got ", cos.sizes());
    TORCH_CHECK(cos.dim() == 2 || heads == kv_heads, "varlen_attention_cuda: per-head rotary tables need as many "
                "key/value heads as query heads (repeat k and v first), got ", heads, " and ", kv_heads);
  }
  check_packed_bounds(cu_seqlens_q, cu_seqlens_k, query.size(0), key.size(0), max_seqlen_q, max_seqlen_k);
  Problem p;
  p.batch1 = static_cast<int>(cu_seqlens_q.numel() - 1);
  p.heads = static_cast<int>(heads);
  p.len_q = static_cast<int>(max_seqlen_q);
  p.len_k = static_cast<int>(max_seqlen_k);
  p.dim_qk = static_cast<int>(query.size(-1));
  p.dim_v = static_cast<int>(value.size(-1));
  p.kv_group = static_cast<int>(heads / kv_heads);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.causal = is_causal;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  if (rotary_cos.has_value()) check_rotary_slices(p, rotary_cos->size(-1), rotary_interleaved);
  return p;
}

// The packed tables: for the kernels as (1, batch, H, total, R) views, for the fp32 rotation of
// (total, H, D) tensors as (total, 1 or H, R).
std::pair<std::optional<std::pair<at::Tensor, at::Tensor>>, std::optional<std::pair<at::Tensor, at::Tensor>>>
packed_tables(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, const Problem& p) {
  if (!cos.has_value()) return {std::nullopt, std::nullopt};
  const at::Tensor c = float_table(*cos), s = float_table(*sin);
  auto kernel_view = [&](const at::Tensor& t) { return packed_view(t, p.batch1, p.heads); };
  auto token_rows = [](const at::Tensor& t) { return t.dim() == 3 ? t : t.unsqueeze(1); };
  return {std::make_pair(kernel_view(c), kernel_view(s)), std::make_pair(token_rows(c), token_rows(s))};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal, double scale,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved) {
  const Problem p = check_packed_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        is_causal, scale, rotary_cos, rotary_sin, rotary_interleaved);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t total_q = query.size(0);
  at::Tensor out = at::empty({total_q, p.heads, p.dim_v}, query.options());
  at::Tensor lse = at::empty({p.heads, total_q}, query.options().dtype(at::kFloat));
  if (total_q * p.heads == 0) return {out, lse};

  const bool tensor_cores = query.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(query);
  const auto [kernel_tables, tables] = packed_tables(rotary_cos, rotary_sin, p);
  const RotaryOperands rotated = rotary_operands(query, key, tensor_cores, kernel_tables, tables, rotary_interleaved);
  const int64_t kv_heads = p.heads / p.kv_group;
  const at::Tensor q = packed_view(readable_operand(rotated.query, tensor_cores), p.batch1, p.heads);
  const at::Tensor k = packed_view(readable_operand(rotated.key, tensor_cores), p.batch1, kv_heads);
  const at::Tensor v = packed_view(readable_operand(value, tensor_cores), p.batch1, kv_heads);
  const ForwardArgs args{operand(q), operand(k), operand(v), Masks{}, p, rotated.rotary,
                         output(packed_view(out, p.batch1, p.heads)),
                         output(packed_view(lse, p.batch1, p.heads, true))};
  launch_forward(args, static_cast<int64_t>(p.batch1) * p.heads, query.scalar_type(), false);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal, double scale,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved) {
  const Problem p = check_packed_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        is_causal, scale, rotary_cos, rotary_sin, rotary_interleaved);
  const int64_t total_q = query.size(0), kv_heads = p.heads / p.kv_group;
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, {&out, "out"}, {&lse, "lse"}}) {
    check_same_device(*t, query, name);
  }
  check_same_shape(grad_out, {total_q, p.heads, p.dim_v}, "grad_out");
  check_same_shape(out, {total_q, p.heads, p.dim_v}, "out");
  check_same_shape(lse, {p.heads, total_q}, "lse");
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type() &&
                  lse.scalar_type() == at::kFloat,
              "varlen_attention_backward_cuda: grad_out and out must have the query dtype ", query.scalar_type(),
              " and lse float32, got ", grad_out.scalar_type(), ", ", out.scalar_type(), ", ", lse.scalar_type());

  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_q = at::empty(query.sizes(), query.options());
  at::Tensor grad_k = at::empty(key.sizes(), key.options());
  at::Tensor grad_v = at::empty(value.sizes(), value.options());
  // (no early return on empty totals: the kernels write every row, dq = 0 where a sequence has no keys)
  const bool tensor_cores = query.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(query);
  const auto [kernel_tables, tables] = packed_tables(rotary_cos, rotary_sin, p);
  const RotaryOperands rotated = rotary_operands(query, key, tensor_cores, kernel_tables, tables, rotary_interleaved);
  auto view = [&](const at::Tensor& t, int64_t heads) { return packed_view(t, p.batch1, heads); };
  const at::Tensor q = view(readable_operand(rotated.query, tensor_cores), p.heads);
  const at::Tensor k = view(readable_operand(rotated.key, tensor_cores), kv_heads);
  const at::Tensor v = view(readable_operand(value, tensor_cores), kv_heads);
  const at::Tensor dout = view(readable_operand(grad_out, tensor_cores), p.heads);
  const at::Tensor out_rows = view(readable_operand(out, false), p.heads);
  const at::Tensor lse_rows = lse.contiguous();
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const BackwardArgs args{operand(q), operand(k), operand(v), operand(out_rows), operand(dout), Masks{}, p,
                          rotated.rotary, operand(packed_view(lse_rows, p.batch1, p.heads, true)),
                          output(packed_view(delta, p.batch1, p.heads, true)), output(view(grad_q, p.heads)),
                          output(view(grad_k, kv_heads)), output(view(grad_v, kv_heads))};
  // delta per (head, token): the tokens as one sequence (the views' B1 stride is 0)
  BackwardArgs delta_args = args;
  delta_args.p.batch1 = 1;
  delta_args.p.len_q = static_cast<int>(total_q);
  launch_backward(args, delta_args, p.heads * total_q, static_cast<int64_t>(p.batch1) * p.heads, query.scalar_type(),
                  false);
  if (tables.has_value() && !tensor_cores) {  // the fp32 kernels' dq and dk are of the rotated q and k
    grad_q = rotated_columns(grad_q, tables->first, tables->second, rotary_interleaved, true);
    grad_k = rotated_columns(grad_k, tables->first, tables->second, rotary_interleaved, true);
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(vkernels, VKERNELS_DISPATCH_KEY, m) {
  m.impl("attention_cuda", &attention_cuda);
  m.impl("attention_backward_cuda", &attention_backward_cuda);
  m.impl("varlen_attention_cuda", &varlen_attention_cuda);
  m.impl("varlen_attention_backward_cuda", &varlen_attention_backward_cuda);
}

}  // namespace vkernels
