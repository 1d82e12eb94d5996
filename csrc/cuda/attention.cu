// Flash attention, forward and backward, in CUDA C++. The op schemas are defined in Python
// (vkernels/ops/attention.py); this file registers their CUDA implementations:
//   attention_cuda(q, k, v, mask?, is_causal, scale) -> (out, lse)
//   attention_backward_cuda(dout, q, k, v, out, lse, mask?, is_causal, scale) -> (dq, dk, dv)
// q (B,H,Lq,D), k (B,H,Lk,D), v (B,H,Lk,Dv) with any strides but a unit last stride; the mask is
// (B,H,Lq,Lk) with any strides (0 on broadcast dims), bool (True = attend) or additive float.
// Causal is top-left aligned (query i sees key j iff j <= i). lse is the natural-log log-sum-exp of
// the scaled, masked logits; a fully masked row gives out = 0 and lse = +inf, so the backward's
// P = exp(s - lse) is 0 there. The backward is deterministic: no atomics.
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
//   delta     rowsum(dO * O) per query, a preprocess.
// Streaming tiles (K/V in forward and dQ, Q/dO in dK/dV) are double-buffered: at the top of each
// iteration every thread waits for its cp.async group, one __syncthreads publishes the tile and
// proves everyone is done reading the other stage, and the next tile is issued into that stage.
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
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
#include <tuple>
#include <type_traits>

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

// A (B, H, L, dim) tensor with a unit last stride; strides in elements.
struct Operand {
  const void* data;
  int64_t stride_b, stride_h, stride_row;
};

enum MaskKind : int { kMaskBool = 0, kMaskSameDtype = 1, kMaskFloat = 2 };

struct Mask {
  const void* data;  // nullptr when there is no mask
  int64_t stride_b, stride_h, stride_q, stride_k;
  int kind;
};

struct Problem {
  int heads, len_q, len_k, dim_qk, dim_v;
  bool causal;
  float scale, scale_log2;
};

struct ForwardArgs {
  Operand q, k, v;
  Mask mask;
  Problem p;
  void* out;   // (B, H, Lq, Dv) contiguous
  float* lse;  // (B, H, Lq)
};

struct BackwardArgs {
  Operand q, k, v, out, grad_out;
  Mask mask;
  Problem p;
  const float* lse;  // (B, H, Lq) contiguous
  float* delta;      // (B, H, Lq): rowsum(dO * O)
  void* grad_q;      // contiguous, shapes of q, k, v
  void* grad_k;
  void* grad_v;
};

// ---------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

template <typename T>
__device__ __forceinline__ const T* head_ptr(const Operand& o, int b, int h) {
  return static_cast<const T*>(o.data) + b * o.stride_b + h * o.stride_h;
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

// Base-2 logit of score element (row = query, col = key) from its dot product q.k; -inf outside
// the lengths, above the causal diagonal, or where the mask forbids. `edge` is false for tiles that
// are known to lie inside the lengths and below the diagonal, which skips the comparisons.
template <typename T, bool kHasMask>
__device__ __forceinline__ float logit2(float dot, int row, int col, bool edge, const Problem& p, const Mask& mask,
                                        int64_t mask_head) {
  if (edge && (row >= p.len_q || col >= p.len_k || (p.causal && col > row))) return -INFINITY;
  float s = dot * p.scale_log2;
  if constexpr (kHasMask) s += mask_logit2<T>(mask, mask_head + row * mask.stride_q + col * mask.stride_k);
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

// Stores a warp's 16 x (8 * kTiles) fp32 accumulator tile, times `factor`, to rows [row0, row0 + 16)
// and columns [col0, col0 + 8 * kTiles) of a contiguous (len x dim) matrix, through the warp's own
// 16 rows of a [.][kLd] shared tile (`stage`, which no other warp reads) so that global stores are
// 16 bytes wide. Rows past len and columns past dim are dropped.
template <typename T, int kTiles, int kLd>
__device__ __forceinline__ void store_warp_tile(const float (&acc)[kTiles][4], float factor, T* stage, T* dst, int row0,
                                                int len, int col0, int dim, int lane) {
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
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(row0 + row) * dim + col0 + col) =
          *reinterpret_cast<const uint4*>(stage + row * kLd + col);
    }
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

// ---------------------------------------------------------------------------------------------
// Tensor-core forward
// ---------------------------------------------------------------------------------------------

template <typename T, int HD, bool kHasMask>
__global__ void __launch_bounds__(ForwardTiles<HD>::kThreads) attention_forward_kernel(const ForwardArgs args) {
  using Tiles = ForwardTiles<HD>;
  constexpr int kWarpTiles = Tiles::kWarpTiles, kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN;
  constexpr int kLd = Tiles::kLd, kThreads = Tiles::kThreads;
  constexpr int kScoreTiles = kBlockN / 8, kOutTiles = HD / 8;

  VKERNELS_DYNAMIC_SHARED(shared);
  T* const q_tile = reinterpret_cast<T*>(shared);
  T* const k_tiles = q_tile + kBlockM * kLd;
  T* const v_tiles = k_tiles + 2 * kBlockN * kLd;

  const Problem& p = args.p;
  const int num_m_blocks = ceil_div(p.len_q, kBlockM);
  // Last query blocks first: under causal masking they are the longest.
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const int bh = static_cast<int>(blockIdx.x / num_m_blocks);
  const int b = bh / p.heads, h = bh % p.heads;
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
  const int warp_row0 = warp * 16 * kWarpTiles;  // first query row of the warp inside the block
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);
  const int qk_chunks = qk_cols / 16, v_chunks = v_cols / 16;

  const T* q = head_ptr<T>(args.q, b, h);
  const T* k = head_ptr<T>(args.k, b, h);
  const T* v = head_ptr<T>(args.v, b, h);
  const int64_t mask_head = kHasMask ? b * args.mask.stride_b + h * args.mask.stride_h : 0;

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
            s = logit2<T, kHasMask>(s, row, col, edge, p, args.mask, mask_head);
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
  const int64_t row_base = static_cast<int64_t>(bh) * p.len_q;
  T* out = static_cast<T*>(args.out) + row_base * p.dim_v;
#pragma unroll
  for (int mi = 0; mi < kWarpTiles; ++mi) {
    float inv_sum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[mi][half]);
      inv_sum[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int row = m0 + warp_row0 + mi * 16 + group + 8 * half;
      if (quad_lane == 0 && row < p.len_q) {
        args.lse[row_base + row] = sum > 0.0f ? row_max[mi][half] * kLn2 + logf(sum) : INFINITY;
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
                                       m0 + warp_row0 + mi * 16, p.len_q, 0, p.dim_v, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core backward
// ---------------------------------------------------------------------------------------------

// delta[row] = sum_d dO[row, d] * O[row, d], one warp per query row (all dtypes).
template <typename T>
__global__ void __launch_bounds__(256) attention_backward_delta_kernel(const BackwardArgs args, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const Problem& p = args.p;
  const int i = static_cast<int>(row % p.len_q);
  const int bh = static_cast<int>(row / p.len_q);
  const int b = bh / p.heads, h = bh % p.heads;
  const T* grad_out = head_ptr<T>(args.grad_out, b, h) + i * args.grad_out.stride_row;
  const T* out = head_ptr<T>(args.out, b, h) + i * args.out.stride_row;
  float sum = 0.0f;
  for (int d = lane; d < p.dim_v; d += 32) sum += to_float(grad_out[d]) * to_float(out[d]);
  sum = warp_sum(sum);
  if (lane == 0) args.delta[row] = sum;
}

template <typename T, int HD, bool kHasMask>
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

  const Problem& p = args.p;
  const int num_n_blocks = ceil_div(p.len_k, kBlockN);
  const int num_slices = ceil_div(max(p.dim_qk, p.dim_v), kSliceDim);
  const int n_block = static_cast<int>(blockIdx.x % num_n_blocks);
  const int slice = static_cast<int>(blockIdx.x / num_n_blocks) % num_slices;
  const int bh = static_cast<int>(blockIdx.x / num_n_blocks) / num_slices;
  const int b = bh / p.heads, h = bh % p.heads;
  const int n0 = n_block * kBlockN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);
  const int qk_chunks = qk_cols / 16, v_chunks = v_cols / 16;
  const int slice_chunk0 = slice * (kSliceDim / 16);

  const T* q = head_ptr<T>(args.q, b, h);
  const T* k = head_ptr<T>(args.k, b, h);
  const T* v = head_ptr<T>(args.v, b, h);
  const T* grad_out = head_ptr<T>(args.grad_out, b, h);
  const int64_t row_base_q = static_cast<int64_t>(bh) * p.len_q;
  const float* lse = args.lse + row_base_q;
  const float* delta = args.delta + row_base_q;
  const int64_t mask_head = kHasMask ? b * args.mask.stride_b + h * args.mask.stride_h : 0;

  // Queries before the block's first key see none of its keys under causal masking.
  const int m_begin = p.causal ? n0 / kBlockM : 0;
  const int m_end = ceil_div(p.len_q, kBlockM);

  auto load_query_tile = [&](int m_block, int stage) {
    const int row0 = m_block * kBlockM;
    load_tile_async<kBlockM, HD, kThreads>(q_tiles + stage * kBlockM * kLd, q, args.q.stride_row, row0, p.len_q,
                                           p.dim_qk, qk_cols);
    load_tile_async<kBlockM, HD, kThreads>(grad_out_tiles + stage * kBlockM * kLd, grad_out,
                                           args.grad_out.stride_row, row0, p.len_q, p.dim_v, v_cols);
    if (threadIdx.x < kBlockM) {
      const int row = row0 + threadIdx.x;
      const bool valid = row < p.len_q;
      cp_async_4(smem_u32(lse_tiles + stage * kBlockM + threadIdx.x), valid ? lse + row : lse, valid);
      cp_async_4(smem_u32(delta_tiles + stage * kBlockM + threadIdx.x), valid ? delta + row : delta, valid);
    }
  };

  load_tile_async<kBlockN, HD, kThreads>(k_tile, k, args.k.stride_row, n0, p.len_k, p.dim_qk, qk_cols);
  load_tile_async<kBlockN, HD, kThreads>(v_tile, v, args.v.stride_row, n0, p.len_k, p.dim_v, v_cols);
  if (m_begin < m_end) load_query_tile(m_begin, 0);
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

  for (int m_block = m_begin; m_block < m_end; ++m_block) {
    const int stage_index = (m_block - m_begin) & 1;
    const uint32_t stage = stage_index * kStageBytes;
    cp_async_wait_all();
    __syncthreads();
    if (m_block + 1 < m_end) load_query_tile(m_block + 1, stage_index ^ 1);
    cp_async_commit();

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
    float acc_s[kScoreTiles][4] = {};
    float acc_dp[kScoreTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) {
      if (kc < qk_chunks) {
        uint32_t a[4];
        ldmatrix_x4(a, k_addr + kc * 16 * 2);
#pragma unroll
        for (int np = 0; np < kScoreTiles / 2; ++np) {
          uint32_t bq[4];
          ldmatrix_x4(bq, q_addr_b + stage + (np * 16 * kLd + kc * 16) * 2);
          mma_16816<T>(acc_s[2 * np], a, bq[0], bq[1]);
          mma_16816<T>(acc_s[2 * np + 1], a, bq[2], bq[3]);
        }
      }
    }
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) {
      if (kc < v_chunks) {
        uint32_t a[4];
        ldmatrix_x4(a, v_addr + kc * 16 * 2);
#pragma unroll
        for (int np = 0; np < kScoreTiles / 2; ++np) {
          uint32_t bo[4];
          ldmatrix_x4(bo, grad_out_addr_b + stage + (np * 16 * kLd + kc * 16) * 2);
          mma_16816<T>(acc_dp[2 * np], a, bo[0], bo[1]);
          mma_16816<T>(acc_dp[2 * np + 1], a, bo[2], bo[3]);
        }
      }
    }

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
          const float s = logit2<T, kHasMask>(acc_s[qj][2 * half + e], m0 + col, key, edge, p, args.mask, mask_head);
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
  const int64_t row_base_k = static_cast<int64_t>(bh) * p.len_k;
  store_warp_tile<T, kSliceTiles, kLd>(acc_dk, p.scale, k_tile + warp * 16 * kLd,
                                       static_cast<T*>(args.grad_k) + row_base_k * p.dim_qk, key_first, p.len_k,
                                       slice * kSliceDim, p.dim_qk, lane);
  store_warp_tile<T, kSliceTiles, kLd>(acc_dv, 1.0f, v_tile + warp * 16 * kLd,
                                       static_cast<T*>(args.grad_v) + row_base_k * p.dim_v, key_first, p.len_k,
                                       slice * kSliceDim, p.dim_v, lane);
}

template <typename T, int HD, bool kHasMask>
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

  const Problem& p = args.p;
  const int num_m_blocks = ceil_div(p.len_q, kBlockM);
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const int bh = static_cast<int>(blockIdx.x / num_m_blocks);
  const int b = bh / p.heads, h = bh % p.heads;
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
  const int qk_cols = round_up(p.dim_qk, 16), v_cols = round_up(p.dim_v, 16);
  const int qk_chunks = qk_cols / 16, v_chunks = v_cols / 16;

  const T* q = head_ptr<T>(args.q, b, h);
  const T* k = head_ptr<T>(args.k, b, h);
  const T* v = head_ptr<T>(args.v, b, h);
  const T* grad_out = head_ptr<T>(args.grad_out, b, h);
  const int64_t row_base = static_cast<int64_t>(bh) * p.len_q;
  const int64_t mask_head = kHasMask ? b * args.mask.stride_b + h * args.mask.stride_h : 0;

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

  // Rows group and group + 8 of this warp: log-sum-exp in base 2 and delta. Rows past Lq get
  // lse = +inf, hence P = 0.
  const int row_first = m0 + warp * 16;
  float lse2[2], row_delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_first + group + 8 * half;
    lse2[half] = row < p.len_q ? args.lse[row_base + row] * kLog2e : INFINITY;
    row_delta[half] = row < p.len_q ? args.delta[row_base + row] : 0.0f;
  }

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

    // S = Q K^T and dP = dO V^T for this warp's 16 queries.
    float acc_s[kScoreTiles][4] = {};
    float acc_dp[kScoreTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) {
      if (kc < qk_chunks) {
        uint32_t a[4];
        ldmatrix_x4(a, q_addr + kc * 16 * 2);
#pragma unroll
        for (int np = 0; np < kScoreTiles / 2; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, k_addr_b + stage + (np * 16 * kLd + kc * 16) * 2);
          mma_16816<T>(acc_s[2 * np], a, bk[0], bk[1]);
          mma_16816<T>(acc_s[2 * np + 1], a, bk[2], bk[3]);
        }
      }
    }
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) {
      if (kc < v_chunks) {
        uint32_t a[4];
        ldmatrix_x4(a, grad_out_addr + kc * 16 * 2);
#pragma unroll
        for (int np = 0; np < kScoreTiles / 2; ++np) {
          uint32_t bv[4];
          ldmatrix_x4(bv, v_addr_b + stage + (np * 16 * kLd + kc * 16) * 2);
          mma_16816<T>(acc_dp[2 * np], a, bv[0], bv[1]);
          mma_16816<T>(acc_dp[2 * np + 1], a, bv[2], bv[3]);
        }
      }
    }

    // dS = P (dP - delta), in place of dP.
    const int n0 = n_block * kBlockN;
    const bool edge = row_first + 16 > p.len_q || n0 + kBlockN > p.len_k || (p.causal && n0 + kBlockN - 1 > row_first);
#pragma unroll
    for (int nj = 0; nj < kScoreTiles; ++nj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int half = r / 2;
        const int row = row_first + group + 8 * half;
        const int col = n0 + nj * 8 + 2 * quad_lane + (r & 1);
        const float s = logit2<T, kHasMask>(acc_s[nj][r], row, col, edge, p, args.mask, mask_head);
        const float prob = exp2_approx(s - lse2[half]);
        acc_dp[nj][r] = prob * (acc_dp[nj][r] - row_delta[half]);
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      c_tiles_to_a<T>(a, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
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
  store_warp_tile<T, kOutTiles, kLd>(acc_dq, p.scale, q_tile + warp * 16 * kLd,
                                     static_cast<T*>(args.grad_q) + row_base * p.dim_qk, row_first, p.len_q, 0,
                                     p.dim_qk, lane);
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
__device__ __forceinline__ float exact_logit2(float dot, int row, int col, const Problem& p, const Mask& mask,
                                              int64_t mask_head) {
  if (p.causal && col > row) return -INFINITY;
  float s = dot * p.scale_log2;
  if (mask.data != nullptr) s += mask_logit2<float>(mask, mask_head + row * mask.stride_q + col * mask.stride_k);
  return s;
}

__global__ void __launch_bounds__(32 * kExactWarps) attention_forward_exact_kernel(const ForwardArgs args) {
  VKERNELS_SHARED(float, q_rows, [kExactWarps][kMaxHeadDim]);
  const Problem& p = args.p;
  const int num_m_blocks = ceil_div(p.len_q, kExactWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = static_cast<int>(blockIdx.x / num_m_blocks);
  const int row = static_cast<int>(blockIdx.x % num_m_blocks) * kExactWarps + warp;
  if (row >= p.len_q) return;
  const int b = bh / p.heads, h = bh % p.heads;
  const float* k = head_ptr<float>(args.k, b, h);
  const float* v = head_ptr<float>(args.v, b, h);
  const int64_t mask_head = args.mask.data ? b * args.mask.stride_b + h * args.mask.stride_h : 0;
  float* q_row = q_rows[warp];
  load_row_to_shared(q_row, head_ptr<float>(args.q, b, h) + row * args.q.stride_row, p.dim_qk, lane);

  const int key_end = p.causal ? min(p.len_k, row + 1) : p.len_k;
  float acc[kExactColumns] = {};
  float row_max = -INFINITY, row_sum = 0.0f;
  for (int key0 = 0; key0 < key_end; key0 += 32) {
    const int key = key0 + lane;
    float s = -INFINITY;
    if (key < key_end) {
      s = exact_logit2(dot_shared_global(q_row, k + key * args.k.stride_row, p.dim_qk), row, key, p, args.mask,
                       mask_head);
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
  const int64_t out_row = static_cast<int64_t>(bh) * p.len_q + row;
  store_columns(acc, row_sum > 0.0f ? 1.0f / row_sum : 0.0f, static_cast<float*>(args.out) + out_row * p.dim_v,
                p.dim_v, lane);
  if (lane == 0) args.lse[out_row] = row_sum > 0.0f ? row_max * kLn2 + logf(row_sum) : INFINITY;
}

__global__ void __launch_bounds__(32 * kExactWarps) attention_backward_query_exact_kernel(const BackwardArgs args) {
  VKERNELS_SHARED(float, q_rows, [kExactWarps][kMaxHeadDim]);
  VKERNELS_SHARED(float, grad_out_rows, [kExactWarps][kMaxHeadDim]);
  const Problem& p = args.p;
  const int num_m_blocks = ceil_div(p.len_q, kExactWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = static_cast<int>(blockIdx.x / num_m_blocks);
  const int row = static_cast<int>(blockIdx.x % num_m_blocks) * kExactWarps + warp;
  if (row >= p.len_q) return;
  const int b = bh / p.heads, h = bh % p.heads;
  const float* k = head_ptr<float>(args.k, b, h);
  const float* v = head_ptr<float>(args.v, b, h);
  const int64_t mask_head = args.mask.data ? b * args.mask.stride_b + h * args.mask.stride_h : 0;
  const int64_t q_row_index = static_cast<int64_t>(bh) * p.len_q + row;
  float* q_row = q_rows[warp];
  float* grad_out_row = grad_out_rows[warp];
  load_row_to_shared(q_row, head_ptr<float>(args.q, b, h) + row * args.q.stride_row, p.dim_qk, lane);
  load_row_to_shared(grad_out_row, head_ptr<float>(args.grad_out, b, h) + row * args.grad_out.stride_row, p.dim_v,
                     lane);
  const float lse2 = args.lse[q_row_index] * kLog2e;
  const float row_delta = args.delta[q_row_index];

  const int key_end = p.causal ? min(p.len_k, row + 1) : p.len_k;
  float acc[kExactColumns] = {};
  for (int key0 = 0; key0 < key_end; key0 += 32) {
    const int key = key0 + lane;
    float grad_score = 0.0f;
    if (key < key_end) {
      const float s = exact_logit2(dot_shared_global(q_row, k + key * args.k.stride_row, p.dim_qk), row, key, p,
                                   args.mask, mask_head);
      const float prob = exp2f(s - lse2);
      const float grad_prob = dot_shared_global(grad_out_row, v + key * args.v.stride_row, p.dim_v);
      grad_score = prob * (grad_prob - row_delta);
    }
    const int count = min(32, key_end - key0);
    for (int j = 0; j < count; ++j) {
      axpy_columns(acc, __shfl_sync(0xffffffffu, grad_score, j), k + (key0 + j) * args.k.stride_row, p.dim_qk, lane);
    }
  }
  store_columns(acc, p.scale, static_cast<float*>(args.grad_q) + q_row_index * p.dim_qk, p.dim_qk, lane);
}

__global__ void __launch_bounds__(32 * kExactWarps) attention_backward_key_value_exact_kernel(const BackwardArgs args) {
  VKERNELS_SHARED(float, k_rows, [kExactWarps][kMaxHeadDim]);
  VKERNELS_SHARED(float, v_rows, [kExactWarps][kMaxHeadDim]);
  const Problem& p = args.p;
  const int num_n_blocks = ceil_div(p.len_k, kExactWarps);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = static_cast<int>(blockIdx.x / num_n_blocks);
  const int key = static_cast<int>(blockIdx.x % num_n_blocks) * kExactWarps + warp;
  if (key >= p.len_k) return;
  const int b = bh / p.heads, h = bh % p.heads;
  const float* q = head_ptr<float>(args.q, b, h);
  const float* grad_out = head_ptr<float>(args.grad_out, b, h);
  const int64_t row_base_q = static_cast<int64_t>(bh) * p.len_q;
  const int64_t mask_head = args.mask.data ? b * args.mask.stride_b + h * args.mask.stride_h : 0;
  float* k_row = k_rows[warp];
  float* v_row = v_rows[warp];
  load_row_to_shared(k_row, head_ptr<float>(args.k, b, h) + key * args.k.stride_row, p.dim_qk, lane);
  load_row_to_shared(v_row, head_ptr<float>(args.v, b, h) + key * args.v.stride_row, p.dim_v, lane);

  const int query_begin = p.causal ? key : 0;  // causal: only queries at or after the key see it
  float acc_dk[kExactColumns] = {}, acc_dv[kExactColumns] = {};
  for (int query0 = query_begin; query0 < p.len_q; query0 += 32) {
    const int query = query0 + lane;
    float prob = 0.0f, grad_score = 0.0f;
    if (query < p.len_q) {
      const float s = exact_logit2(dot_shared_global(k_row, q + query * args.q.stride_row, p.dim_qk), query, key, p,
                                   args.mask, mask_head);
      prob = exp2f(s - args.lse[row_base_q + query] * kLog2e);
      const float grad_prob =
          dot_shared_global(v_row, grad_out + query * args.grad_out.stride_row, p.dim_v);
      grad_score = prob * (grad_prob - args.delta[row_base_q + query]);
    }
    const int count = min(32, p.len_q - query0);
    for (int j = 0; j < count; ++j) {
      const int other = query0 + j;
      axpy_columns(acc_dv, __shfl_sync(0xffffffffu, prob, j), grad_out + other * args.grad_out.stride_row, p.dim_v,
                   lane);
      axpy_columns(acc_dk, __shfl_sync(0xffffffffu, grad_score, j), q + other * args.q.stride_row, p.dim_qk, lane);
    }
  }
  const int64_t k_row_index = static_cast<int64_t>(bh) * p.len_k + key;
  store_columns(acc_dk, p.scale, static_cast<float*>(args.grad_k) + k_row_index * p.dim_qk, p.dim_qk, lane);
  store_columns(acc_dv, 1.0f, static_cast<float*>(args.grad_v) + k_row_index * p.dim_v, p.dim_v, lane);
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

Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// cp.async moves 16-byte chunks: the data pointer and every stride that matters must be multiples
// of 16 bytes. Views that break this (rare: odd storage offsets or row strides) are copied.
at::Tensor aligned_for_tensor_cores(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) == 1 || (t.stride(d) * t.element_size()) % 16 == 0);
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_same_device(const at::Tensor& t, const at::Tensor& query, const char* name) {
  TORCH_CHECK(t.device() == query.device(), "attention_cuda: ", name, " is on ", t.device(), " but query is on ",
              query.device());
}

// Checks query/key/value/mask and fills the problem description.
Problem check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale) {
  TORCH_CHECK(on_kernel_device(query), "attention_cuda: query must be a ", kKernelDevice, " tensor, got one on ",
              query.device());
  check_same_device(key, query, "key");
  check_same_device(value, query, "value");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "attention_cuda: query, key and value must be 4-D (batch, heads, length, head_dim), got shapes ",
              query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "attention_cuda: query must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype,
              "attention_cuda: query, key and value must share a dtype, got ", dtype, ", ", key.scalar_type(), ", ",
              value.scalar_type());
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0) && key.size(1) == query.size(1) &&
                  value.size(1) == query.size(1),
              "attention_cuda: batch and heads of query ", query.sizes(), ", key ", key.sizes(), " and value ",
              value.sizes(), " must match");
  TORCH_CHECK(key.size(2) == value.size(2), "attention_cuda: key ", key.sizes(), " and value ", value.sizes(),
              " must have the same length");
  TORCH_CHECK(key.size(3) == query.size(3), "attention_cuda: query ", query.sizes(), " and key ", key.sizes(),
              " must have the same head dim");
  for (const at::Tensor* t : {&query, &value}) {
    const int64_t dim = t->size(3);
    TORCH_CHECK(dim >= 8 && dim <= kMaxHeadDim && dim % 8 == 0,
                "attention_cuda: head dims must be multiples of 8 in [8, 256], got ", dim);
  }
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "attention_cuda: query, key and value need a unit stride along the head dim, got strides ",
              query.strides(), ", ", key.strides(), ", ", value.strides());
  const int64_t batch = query.size(0), heads = query.size(1), len_q = query.size(2), len_k = key.size(2);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(batch * heads <= kIntMax && len_q <= kIntMax && len_k <= kIntMax,
              "attention_cuda: sizes must fit in 32 bits, got ", query.sizes(), " and ", key.sizes());
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    check_same_device(mask, query, "attn_mask");
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == batch && mask.size(1) == heads && mask.size(2) == len_q &&
                    mask.size(3) == len_k,
                "attention_cuda: attn_mask must be expanded to (batch, heads, Lq, Lk) = (", batch, ", ", heads, ", ",
                len_q, ", ", len_k, "), got ", mask.sizes());
    const auto mask_dtype = mask.scalar_type();
    TORCH_CHECK(mask_dtype == at::kBool || mask_dtype == dtype || mask_dtype == at::kFloat,
                "attention_cuda: attn_mask must be bool, float32 or the query dtype (", dtype, "), got ", mask_dtype);
  }
  Problem p;
  p.heads = static_cast<int>(heads);
  p.len_q = static_cast<int>(len_q);
  p.len_k = static_cast<int>(len_k);
  p.dim_qk = static_cast<int>(query.size(3));
  p.dim_v = static_cast<int>(value.size(3));
  p.causal = is_causal;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

Mask mask_of(const std::optional<at::Tensor>& attn_mask, at::ScalarType dtype) {
  if (!attn_mask.has_value()) return {nullptr, 0, 0, 0, 0, kMaskBool};
  const at::Tensor& m = *attn_mask;
  const int kind = m.scalar_type() == at::kBool ? kMaskBool : m.scalar_type() == dtype ? kMaskSameDtype : kMaskFloat;
  return {m.data_ptr(), m.stride(0), m.stride(1), m.stride(2), m.stride(3), kind};
}

void check_tensor_core_device(const at::Tensor& query) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, query.device().index()));
  TORCH_CHECK(major >= 8, "attention_cuda: float16/bfloat16 need a GPU of compute capability 8.0 or newer");
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                  bool is_causal, double scale) {
  const Problem p = check_inputs(query, key, value, attn_mask, is_causal, scale);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch_heads = query.size(0) * query.size(1);
  at::Tensor out = at::empty({query.size(0), query.size(1), p.len_q, p.dim_v}, query.options());
  at::Tensor lse = at::empty({query.size(0), query.size(1), p.len_q}, query.options().dtype(at::kFloat));
  if (batch_heads * p.len_q == 0) return {out, lse};

  const bool exact = query.scalar_type() == at::kFloat;
  if (!exact) check_tensor_core_device(query);
  const at::Tensor q = exact ? query : aligned_for_tensor_cores(query);
  const at::Tensor k = exact ? key : aligned_for_tensor_cores(key);
  const at::Tensor v = exact ? value : aligned_for_tensor_cores(value);
  ForwardArgs args{operand(q), operand(k), operand(v), mask_of(attn_mask, query.scalar_type()), p,
                   out.data_ptr(), lse.data_ptr<float>()};

  if (exact) {
    launch(attention_forward_exact_kernel, ceil_div(p.len_q, kExactWarps) * batch_heads, 32 * kExactWarps, 0, args);
    return {out, lse};
  }
  dispatch_dtype(query.scalar_type(), "attention_cuda", [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>) {
      dispatch_head_dim_class(std::max(p.dim_qk, p.dim_v), [&](auto head_dim) {
        constexpr int HD = decltype(head_dim)::value;
        using Tiles = ForwardTiles<HD>;
        dispatch_bool(attn_mask.has_value(), [&](auto has_mask) {
          launch(attention_forward_kernel<T, HD, decltype(has_mask)::value>,
                 ceil_div(p.len_q, Tiles::kBlockM) * batch_heads, Tiles::kThreads, Tiles::kSmemBytes, args);
        });
      });
    }
  });
  return {out, lse};
}

void check_same_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "attention_backward_cuda: ", name, " must have shape ", shape, ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, bool is_causal,
    double scale) {
  const Problem p = check_inputs(query, key, value, attn_mask, is_causal, scale);
  check_same_device(grad_out, query, "grad_out");
  check_same_device(out, query, "out");
  check_same_device(lse, query, "lse");
  const int64_t batch = query.size(0), heads = query.size(1);
  check_same_shape(grad_out, {batch, heads, p.len_q, p.dim_v}, "grad_out");
  check_same_shape(out, {batch, heads, p.len_q, p.dim_v}, "out");
  check_same_shape(lse, {batch, heads, p.len_q}, "lse");
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "attention_backward_cuda: grad_out and out must have the query dtype ", query.scalar_type(), ", got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "attention_backward_cuda: lse must be float32, got ",
              lse.scalar_type());

  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_q = at::empty(query.sizes(), query.options());
  at::Tensor grad_k = at::empty(key.sizes(), key.options());
  at::Tensor grad_v = at::empty(value.sizes(), value.options());
  const int64_t batch_heads = batch * heads;
  if (batch_heads == 0) return {grad_q, grad_k, grad_v};

  const bool exact = query.scalar_type() == at::kFloat;
  if (!exact) check_tensor_core_device(query);
  const at::Tensor q = exact ? query : aligned_for_tensor_cores(query);
  const at::Tensor k = exact ? key : aligned_for_tensor_cores(key);
  const at::Tensor v = exact ? value : aligned_for_tensor_cores(value);
  // Autograd may hand over an expanded gradient (e.g. of a sum): read it densely then.
  const at::Tensor dout_rows = grad_out.stride(3) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor dout = exact ? dout_rows : aligned_for_tensor_cores(dout_rows);
  const at::Tensor out_rows = out.stride(3) == 1 ? out : out.contiguous();
  const at::Tensor lse_rows = lse.contiguous();
  at::Tensor delta = at::empty({batch, heads, p.len_q}, query.options().dtype(at::kFloat));
  BackwardArgs args{operand(q), operand(k), operand(v), operand(out_rows), operand(dout),
                    mask_of(attn_mask, query.scalar_type()), p, lse_rows.data_ptr<float>(), delta.data_ptr<float>(),
                    grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr()};

  dispatch_dtype(query.scalar_type(), "attention_cuda", [&](auto element) {
    using T = decltype(element);
    const int64_t rows = batch_heads * p.len_q;
    launch(attention_backward_delta_kernel<T>, (rows + 7) / 8, 256, 0, args, rows);
    if constexpr (std::is_same_v<T, float>) {
      launch(attention_backward_key_value_exact_kernel, ceil_div(p.len_k, kExactWarps) * batch_heads,
             32 * kExactWarps, 0, args);
      launch(attention_backward_query_exact_kernel, ceil_div(p.len_q, kExactWarps) * batch_heads, 32 * kExactWarps, 0,
             args);
    } else {
      dispatch_head_dim_class(std::max(p.dim_qk, p.dim_v), [&](auto head_dim) {
        constexpr int HD = decltype(head_dim)::value;
        using KeyValue = KeyValueGradTiles<HD>;
        using Query = QueryGradTiles<HD>;
        const int64_t slices = ceil_div(std::max(p.dim_qk, p.dim_v), KeyValue::kSliceDim);
        dispatch_bool(attn_mask.has_value(), [&](auto has_mask) {
          constexpr bool kHasMask = decltype(has_mask)::value;
          launch(attention_backward_key_value_kernel<T, HD, kHasMask>,
                 ceil_div(p.len_k, KeyValue::kBlockN) * slices * batch_heads, KeyValue::kThreads, KeyValue::kSmemBytes,
                 args);
          launch(attention_backward_query_kernel<T, HD, kHasMask>, ceil_div(p.len_q, Query::kBlockM) * batch_heads,
                 Query::kThreads, Query::kSmemBytes, args);
        });
      });
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(vkernels, VKERNELS_DISPATCH_KEY, m) {
  m.impl("attention_cuda", &attention_cuda);
  m.impl("attention_backward_cuda", &attention_backward_cuda);
}

}  // namespace vkernels
