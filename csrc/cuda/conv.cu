// Fused conv2d + bias (+ residual) + activation, forward and backward, and the fused conv + ReLU +
// max-pool forward, in CUDA C++. The op schemas are defined in Python (vkernels/ops/conv.py); this
// file registers their CUDA implementations:
//   conv2d_cuda(input, weight, bias?, residual?, stride, padding, dilation, groups, output_size,
//               activation, negative_slope, save_pre_activation) -> (out, pre-activation?)
//   conv2d_backward_cuda(grad_out, saved?, input, weight, stride, padding, dilation, groups, needs,
//                        channels_last, activation, negative_slope)
//                        -> (grad_input?, grad_weight?, grad_bias?, grad_residual?)
//   conv2d_relu_cuda / conv2d_relu_backward_cuda: the two above with activation "relu" (saved = out)
//   conv2d_relu_maxpool2d_cuda(input, weight, bias?, stride, padding, dilation, groups, conv_output_size,
//                              pool_kernel_size, pool_stride, pool_padding, output_size) -> (out, argmax)
// Semantics are those of vkernels/triton_kernels/conv.py: out = act(conv2d + bias + residual) with the
// epilogue fused, act computed in fp32 with torch's formulas (activate; the pre-activation is written
// only when asked for); padding = (top, left) and output positions whose window reaches past the
// input read zeros there, which expresses torch's asymmetric 'same'. The backward takes the
// activation's derivative from `saved` (the output for relu, relu6 and leaky_relu with a slope >= 0,
// else the pre-activation; vkernels/ops/conv.py decides): for ReLU it masks grad_out by out > 0 as it
// loads it; other activations first write grad_pre = grad_out * act'(saved) in the dtype (one pass,
// as torch's separate activation backward does), which the GEMMs, the residual's and the bias's
// gradients then read. It is deterministic: the weight and bias reductions are split into slices
// summed in a fixed order, no atomics.
//
// Every convolution runs as an implicit GEMM (no im2col buffer); the operands are gathered from NHWC
// activations on the fly, K ordered (kh, kw, channel) so that 8 consecutive K elements are one
// 16-byte load whenever the channels per group are a multiple of 8:
//   forward       [N*OH*OW x Cout_g] = sum over K = KH*KW*Cin_g of input[moved pixel, cin] * weight
//                 (A = input rows, B = weight rows [cout][kh][kw][cin] = OHWI); bias, residual and
//                 ReLU in the epilogue.
//   input grad    [N*H*W x Cin_g] over K = (tap, cout): A = masked grad_out at pixel (ih + pad -
//                 kh*dil) / stride, B = weight stored [cin][kh][kw][cout] (a small permuted copy).
//                 Input pixels are split by phase (position mod stride, grid z), so that every pixel
//                 of a block meets the same taps and no MMA is spent on taps between output pixels.
//   weight grad   [KH*KW*Cin_g x Cout_g] reducing over the N*OH*OW pixels (A = moved input, B =
//                 masked grad_out, both stored pixel-major: [k][m] and [k][n] tiles, read with
//                 ldmatrix .trans); grid z splits the pixels into slices written as float32
//                 partials, which a second kernel adds in slice order into the weight's format.
// fp16/bf16 run on tensor cores (mma.sync m16n8k16, fp32 accumulators): 128x64x32 tiles, 4 warps of
// 64x32, A and B double-buffered with cp.async (zero-filled outside the input). Operands that cannot
// be copied 16 bytes at a time (channels per group not a multiple of 8, e.g. the RGB stem) or that
// carry the ReLU mask go through registers instead: loaded before the MMAs of the current stage,
// stored to shared memory after them. fp32 runs a plain-FMA tiled kernel (64x64x16) on the same
// gathers, exact up to summation order. A convolution with fewer than 8 output channels per group
// runs forward as a direct per-output loop (a GEMM tile would be mostly padding). Depthwise convs
// (one input and one output channel per group: MobileNets' and EfficientNets' 3x3/5x5) also get
// direct gradients: the input gradient gathers each input element's taps (no atomics), and the
// weight gradient sums input x grad_pre per (channel, tap) over pixel slices, added in slice order
// as the bias gradient's are (channel_sums_partial_kernel).
//
// Index arithmetic would otherwise outweigh the MMAs: each gather offset is an m (or n) part plus a
// k part (Op::m_part, n_part, k_part). What stays fixed over the K loop is computed once per thread
// before it (ChunkOffsets: a chunk row's window origin or weight row; transposed, the thread's one
// column's (tap, channel)), and k is kept as mixed-radix digits ((tap row, tap column, channel), or
// the weight gradient's (image, row, column)) to which each K tile adds the digits of kBlockK, so the
// loop divides nothing. Element-wise gathers recompute the moving part of elements 1..7 of a chunk.
//
// The fused max-pool (its backward is Python: recompute the activation, then the pool's and this
// file's backward ops) is the forward GEMM with its rows regrouped: a tile of 128 (fp32: 64) rows
// holds floor(128 / window) whole pool windows, row = (pooled pixel, window position), position
// fastest. The epilogue adds bias, applies ReLU, rounds to the output dtype (the value the unfused ops
// compare), stages the tile in shared memory (the freed operand buffers) and scans each window in
// row-major order with torch's rule (greater or NaN replaces; padding positions are skipped), writing
// the maximum and its position; the activation never reaches global memory. Overlapping windows
// (3x3/2) recompute the conv pixels they share (2.25x the conv's MMAs, as the Triton kernel does),
// traded for simple whole-window tiles. Windows larger than a tile and fewer than 8 output channels
// per group run a direct per-pooled-output loop instead.
//
// Host-side copies (documented costs): input, grad_out and out are read channels_last-contiguous
// (NCHW tensors are copied once); the forward weight is read OHWI (copied when it is OIHW), the
// input-gradient weight [cin][kh][kw][cout]. Residual, bias and all outputs use their own strides.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "mma.cuh"
#include "pool_window.cuh"
#include "runtime.cuh"

namespace vkernels {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Tensor-core tiles: kThreads = 4 warps in a 2x2 grid, each warp 64 x 32 of the 128 x 64 tile.
constexpr int kBlockM = 128, kBlockN = 64, kBlockK = 32, kThreads = 128;
constexpr int kChunk = 8;  // 16-bit elements per 16-byte copy
// Plain-FMA tiles: 256 threads, each 4 x 4 outputs.
constexpr int kSimtM = 64, kSimtN = 64, kSimtK = 16, kSimtThreads = 256;
// Weight-gradient slices hold a multiple of both K steps, so a slice never splits a K tile.
constexpr int kSliceQuantum = 32;

// A 4-D tensor read through its strides, in logical (N, C, H, W) order, in elements.
struct View4 {
  const void* data;
  int64_t sn, sc, sh, sw;
};

// The fused max-pool: window geometry over the conv output (out_h x out_w), the pooled output size,
// the GEMM tiling by whole windows (see PooledForwardOp) and the argmax (int8/16/32: argmax_bytes).
struct PoolArgs {
  int kh, kw, stride_h, stride_w, pad_h, pad_w, out_h, out_w;
  int tile_rows, tile_windows;  // GEMM rows per block tile and the whole windows they hold
  void* argmax;
  int argmax_bytes;
  int64_t argmax_sn, argmax_sc, argmax_sh, argmax_sw;
};

// The activations of vkernels/ops/conv.py, numbered as vkernels/triton_kernels/conv_common.ACTIVATIONS.
enum class Activation : int { kNone, kRelu, kRelu6, kLeakyRelu, kHardswish, kSilu, kGelu, kGeluTanh };

struct ConvArgs {
  View4 x;               // input (N, Cin, H, W)
  View4 w;               // weight (Cout, Cin_g, KH, KW)
  View4 g;               // grad_out, or grad_pre for activations other than ReLU (N, Cout, OH, OW)
  const void* relu_out;  // out, with g's strides: grad_out is masked by out > 0 as it is loaded; null = no mask
  View4 residual;        // data is null when there is none
  const void* bias;      // contiguous (Cout,), or null
  void* dst;             // forward: out; input gradient: grad_input (N, Cin, H, W)
  int64_t dst_sn, dst_sc, dst_sh, dst_sw;
  void* pre;             // forward: the pre-activation, with dst's strides; null = not written
  Activation activation; // forward: the epilogue's activation
  float negative_slope;  // leaky_relu's
  float* partial;        // weight gradient: (slices, groups, KH*KW*Cin_g, Cout_g) float32 sums
  int batch, in_h, in_w, out_h, out_w, groups, cin_g, cout_g, kh, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int slice_pixels;  // weight gradient: pixels per slice, a multiple of kSliceQuantum
  bool vec_a, vec_b; // the A / B gathers may move 8 elements (16 bytes) at a time
  PoolArgs pool;     // fused max-pool forward only
};

// What one block computes: a GEMM of m_size x n_size over k in [k_begin, k_end), for one group
// (grid y) and one input-gradient phase or weight-gradient slice (grid z).
struct Block {
  int group, m_size, n_size, k_begin, k_end;
  int slice;
  int phase_h, phase_w, rows, cols, first_h, first_w, count_w, step_h, step_w;  // input gradient
  int out_shift_h, out_shift_w, out_step_h, out_step_w;  // grad_out pixel of tap 0 from (i, j), and per tap
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// out > 0 for the bits of an fp16/bf16 value: 0 < bits <= +inf (NaN, -0 and negatives are not).
template <typename T>
__device__ __forceinline__ bool positive_bits(uint32_t bits) {
  constexpr uint32_t kInfBits = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;
  return ((bits - 1u) & 0xffffu) < kInfBits;
}

// ---------------------------------------------------------------------------------------------
// The three GEMMs: where element (m, k) of A and (n, k) of B live (-1: outside, reads zero), and
// what happens to an accumulated element (m, n). An offset is put together from an m (or n) part
// and a k part (m_part, n_part, k_part), so that the GEMM kernels compute the part that stays fixed
// over their K loop once; a_offset_at / b_offset_at put one element's offset together.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }  // NaN stays NaN, as in torch.relu

constexpr float kSqrtHalf = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f, kGeluTanhCubic = 0.044715f;

// act(x) in fp32 with the formulas of aten's CUDA kernels; relu, relu6 and leaky_relu keep NaN.
__device__ __forceinline__ float activate(Activation act, float x, float slope) {
  switch (act) {
    case Activation::kRelu: return relu(x);
    case Activation::kRelu6: return x < 0.0f ? 0.0f : (x > 6.0f ? 6.0f : x);
    case Activation::kLeakyRelu: return x > 0.0f ? x : x * slope;
    case Activation::kHardswish: return x * fminf(fmaxf(x + 3.0f, 0.0f), 6.0f) / 6.0f;
    case Activation::kSilu: return x / (1.0f + expf(-x));
    case Activation::kGelu: return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
    case Activation::kGeluTanh: return 0.5f * x * (1.0f + tanhf((x + kGeluTanhCubic * x * x * x) * kSqrt2OverPi));
    case Activation::kNone: break;
  }
  return x;
}

// grad * act'(pre-activation), in fp32, from `saved`: the output for relu, relu6 and leaky_relu with a
// slope >= 0 (the sign and the [0, 6] band survive the activation), else the pre-activation; as torch's
// *_backward kernels compute it (hardswish's slope on the open interval (-3, 3)).
__device__ __forceinline__ float activation_grad(Activation act, float grad, float saved, float slope) {
  switch (act) {
    case Activation::kRelu: return saved > 0.0f ? grad : 0.0f;
    case Activation::kRelu6: return saved > 0.0f && saved < 6.0f ? grad : 0.0f;
    case Activation::kLeakyRelu: return saved > 0.0f ? grad : grad * slope;
    case Activation::kHardswish: return saved <= -3.0f ? 0.0f : (saved < 3.0f ? grad * (saved / 3.0f + 0.5f) : grad);
    case Activation::kSilu: {
      const float sigmoid = 1.0f / (1.0f + expf(-saved));
      return grad * sigmoid * (1.0f + saved * (1.0f - sigmoid));
    }
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.0f + erff(saved * kSqrtHalf));
      const float pdf = expf(-0.5f * saved * saved) * kInvSqrt2Pi;
      return grad * (cdf + saved * pdf);
    }
    case Activation::kGeluTanh: {
      const float inner = tanhf((saved + kGeluTanhCubic * saved * saved * saved) * kSqrt2OverPi);
      const float inner_slope = (1.0f + 3.0f * kGeluTanhCubic * saved * saved) * kSqrt2OverPi;
      return grad * (0.5f * (1.0f + inner) + 0.5f * saved * (1.0f - inner * inner) * inner_slope);
    }
    case Activation::kNone: break;
  }
  return grad;
}

// An index as mixed-radix digits, lo fastest: k = (tap row, tap column, channel), or a pixel = (image,
// row, column). Adding the digits of a step replaces the divisions of a fresh split.
struct Digits {
  int hi, mid, lo;
};
struct Radix {
  int mid, lo;  // sizes of the two fastest digits
  __host__ __device__ Digits split(int i) const {
    const int rest = i / lo;
    return {rest / mid, rest % mid, i % lo};
  }
  // split(i + step) from d = split(i) and s = split(step) (or s = {0, 0, 1}): one carry per digit.
  __host__ __device__ Digits add(Digits d, const Digits& s) const {
    d.hi += s.hi;
    d.mid += s.mid;
    d.lo += s.lo;
    if (d.lo >= lo) {
      d.lo -= lo;
      ++d.mid;
    }
    if (d.mid >= mid) {
      d.mid -= mid;
      ++d.hi;
    }
    return d;
  }
};

// A position in an NHWC tensor: element offset and (h, w). A gathered element is a window origin (an
// output pixel's corner, or the grad_out pixel of an input pixel's first tap) plus a tap relative to it.
struct Point {
  int64_t offset;
  int h, w;
};
__host__ __device__ inline int64_t offset_inside(const Point& origin, const Point& tap, int height, int width) {
  const int h = origin.h + tap.h, w = origin.w + tap.w;
  return h >= 0 && h < height && w >= 0 && w < width ? origin.offset + tap.offset : -1;
}

// k's part in the forward and input-gradient GEMMs: the tap relative to an A row's origin, and the
// offset within a B (weight) row; nothing when k >= k_end.
struct WindowTap {
  Point tap;
  int64_t weight;
  bool inside;
  __host__ __device__ int64_t a_offset(const Point& origin, int height, int width) const {
    return inside ? offset_inside(origin, tap, height, width) : -1;
  }
  __host__ __device__ int64_t b_offset(int64_t row) const { return row >= 0 && inside ? row + weight : -1; }
};

struct ForwardOp {
  static constexpr bool kTransposed = false;  // A tile [m][k], B tile [n][k]: K is the contiguous dim
  static constexpr bool kMaskA = false, kMaskB = false;
  static constexpr bool kPooled = false;  // the epilogue stores each element (else: PooledForwardOp)
  using MPart = Point;    // the window origin of output pixel m
  using NPart = int64_t;  // the start of weight row n, -1 past n_size
  using KPart = WindowTap;
  __device__ static const void* a_data(const ConvArgs& a) { return a.x.data; }
  __device__ static const void* b_data(const ConvArgs& a) { return a.w.data; }

  __host__ __device__ static Block block(const ConvArgs& a, int group, int) {
    Block b{};
    b.group = group;
    b.m_size = a.batch * a.out_h * a.out_w;
    b.n_size = a.cout_g;
    b.k_end = a.kh * a.kw * a.cin_g;
    return b;
  }
  // Output pixel m = (image, row, column).
  __host__ __device__ static Radix pixel_radix(const ConvArgs& a) { return {a.out_h, a.out_w}; }
  // Input pixel (oh * stride - pad, ow * stride - pad), channel 0 of the group.
  __host__ __device__ static Point origin(const ConvArgs& a, const Block& b, int img, int oh, int ow) {
    const int h = oh * a.stride_h - a.pad_h, w = ow * a.stride_w - a.pad_w;
    return {img * a.x.sn + h * a.x.sh + w * a.x.sw + int64_t{b.group} * a.cin_g * a.x.sc, h, w};
  }
  // An origin that gathers nothing: taps only move down, so h = in_h stays below the input.
  __host__ __device__ static Point outside(const ConvArgs& a) { return {0, a.in_h, 0}; }
  // Input element k = (tap, channel) relative to a window origin.
  __host__ __device__ static Point tap(const ConvArgs& a, const Digits& k) {
    const int h = k.hi * a.dil_h, w = k.mid * a.dil_w;
    return {h * a.x.sh + w * a.x.sw + k.lo * a.x.sc, h, w};
  }
  __host__ __device__ static Radix k_radix(const ConvArgs& a, const Block&) { return {a.kw, a.cin_g}; }
  __host__ __device__ static Point m_part(const ConvArgs& a, const Block& b, int m) {
    if (m >= b.m_size) return outside(a);
    const Digits pixel = pixel_radix(a).split(m);
    return origin(a, b, pixel.hi, pixel.mid, pixel.lo);
  }
  __host__ __device__ static int64_t n_part(const ConvArgs& a, const Block& b, int n) {
    return n < b.n_size ? static_cast<int64_t>(b.group * a.cout_g + n) * a.w.sn : -1;
  }
  __host__ __device__ static WindowTap k_part(const ConvArgs& a, const Block& b, const Digits& k_digits, int k) {
    if (k >= b.k_end) return {{0, 0, 0}, 0, false};
    return {tap(a, k_digits), k_digits.lo * a.w.sc + k_digits.hi * a.w.sh + k_digits.mid * a.w.sw, true};
  }
  __host__ __device__ static int64_t a_offset(const ConvArgs& a, const Block&, const Point& m, const WindowTap& k) {
    return k.a_offset(m, a.in_h, a.in_w);
  }
  __host__ __device__ static int64_t b_offset(const ConvArgs&, const Block&, int64_t n, const WindowTap& k) {
    return k.b_offset(n);
  }
  template <typename T>
  __device__ static float add_bias(const ConvArgs& a, int channel, float v) {
    return a.bias != nullptr ? v + to_float(static_cast<const T*>(a.bias)[channel]) : v;
  }
  template <typename T>
  __device__ static void store(const ConvArgs& a, const Block& b, int m, int n, float v) {
    const Digits pixel = pixel_radix(a).split(m);
    const int img = pixel.hi, oh = pixel.mid, ow = pixel.lo;
    const int channel = b.group * a.cout_g + n;
    v = add_bias<T>(a, channel, v);
    if (a.residual.data != nullptr) {
      v += to_float(static_cast<const T*>(a.residual.data)[img * a.residual.sn + channel * a.residual.sc +
                                                            oh * a.residual.sh + ow * a.residual.sw]);
    }
    const int64_t at = img * a.dst_sn + channel * a.dst_sc + oh * a.dst_sh + ow * a.dst_sw;
    if (a.pre != nullptr) static_cast<T*>(a.pre)[at] = from_float<T>(v);
    static_cast<T*>(a.dst)[at] = from_float<T>(activate(a.activation, v, a.negative_slope));
  }
};

// conv2d_relu_maxpool2d's forward: the forward GEMM over rows regrouped by pool window. Row m is
// position m % tile_rows % window of pooled pixel (m / tile_rows) * tile_windows + m % tile_rows / window,
// so each block tile holds whole windows; the rows after a tile's last whole window and the positions in
// the pool's padding gather nothing, and the epilogue (store_pooled_tile) never reads them.
struct PooledForwardOp : ForwardOp {
  static constexpr bool kPooled = true;

  __host__ __device__ static int pooled_pixels(const ConvArgs& a) { return a.batch * a.pool.out_h * a.pool.out_w; }
  __host__ __device__ static Block block(const ConvArgs& a, int group, int) {
    Block b = ForwardOp::block(a, group, 0);
    b.m_size = ceil_div(pooled_pixels(a), a.pool.tile_windows) * a.pool.tile_rows;
    return b;
  }
  __host__ __device__ static void pooled_coords(const ConvArgs& a, int pooled, int& img, int& ph, int& pw) {
    pw = pooled % a.pool.out_w;
    const int rest = pooled / a.pool.out_w;
    ph = rest % a.pool.out_h;
    img = rest / a.pool.out_h;
  }
  // The conv output pixel (oh, ow) under window position `position` of pooled pixel (ph, pw); false in
  // the pool's padding (torch's -inf, never chosen).
  __host__ __device__ static bool window_pixel(const ConvArgs& a, int ph, int pw, int position, int& oh, int& ow) {
    oh = ph * a.pool.stride_h - a.pool.pad_h + position / a.pool.kw;
    ow = pw * a.pool.stride_w - a.pool.pad_w + position % a.pool.kw;
    return oh >= 0 && oh < a.out_h && ow >= 0 && ow < a.out_w;
  }
  __host__ __device__ static Point m_part(const ConvArgs& a, const Block& b, int m) {
    if (m >= b.m_size) return outside(a);
    const int window = a.pool.kh * a.pool.kw, row = m % a.pool.tile_rows;
    const int pooled = m / a.pool.tile_rows * a.pool.tile_windows + row / window;
    if (row >= a.pool.tile_windows * window || pooled >= pooled_pixels(a)) return outside(a);
    int img, ph, pw, oh, ow;
    pooled_coords(a, pooled, img, ph, pw);
    if (!window_pixel(a, ph, pw, row % window, oh, ow)) return outside(a);
    return origin(a, b, img, oh, ow);
  }
  // The activation at output channel n of the group, rounded to T as the unfused ops would compare it.
  template <typename T>
  __device__ static T activation(const ConvArgs& a, const Block& b, int n, float v) {
    return from_float<T>(relu(add_bias<T>(a, b.group * a.cout_g + n, v)));
  }
};

struct InputGradOp {
  static constexpr bool kTransposed = false;
  static constexpr bool kMaskA = true, kMaskB = false;
  static constexpr bool kPooled = false;
  using MPart = Point;    // the grad_out pixel of input pixel m's first tap
  using NPart = int64_t;  // input channel n's start in the weight, -1 past n_size
  using KPart = WindowTap;
  __device__ static const void* a_data(const ConvArgs& a) { return a.g.data; }
  __device__ static const void* b_data(const ConvArgs& a) { return a.w.data; }

  // Taps along one axis that connect input positions = phase (mod stride) to output positions: tap k
  // does iff phase + pad - k*dil is a multiple of stride; they are `step` = stride / gcd apart.
  __host__ __device__ static void phase_taps(int phase, int pad, int dil, int stride, int taps, int& first,
                                             int& count) {
    first = 0;
    count = 0;
    for (int k = taps - 1; k >= 0; --k) {
      if ((phase + pad - k * dil) % stride == 0) {
        first = k;
        ++count;
      }
    }
  }
  __host__ __device__ static int gcd(int a, int b) {
    while (b != 0) {
      const int t = a % b;
      a = b;
      b = t;
    }
    return a;
  }
  __host__ __device__ static Block block(const ConvArgs& a, int group, int phase) {
    Block b{};
    b.group = group;
    b.phase_h = phase / a.stride_w;
    b.phase_w = phase % a.stride_w;
    b.rows = max(0, ceil_div(a.in_h - b.phase_h, a.stride_h));
    b.cols = max(0, ceil_div(a.in_w - b.phase_w, a.stride_w));
    int count_h;
    phase_taps(b.phase_h, a.pad_h, a.dil_h, a.stride_h, a.kh, b.first_h, count_h);
    phase_taps(b.phase_w, a.pad_w, a.dil_w, a.stride_w, a.kw, b.first_w, b.count_w);
    b.step_h = a.stride_h / gcd(a.stride_h, a.dil_h);
    b.step_w = a.stride_w / gcd(a.stride_w, a.dil_w);
    // exact divisions: the phase's taps make phase + pad - kh*dil a multiple of the stride, and
    // step*dil = lcm(stride, dil)
    b.out_shift_h = (b.phase_h + a.pad_h - b.first_h * a.dil_h) / a.stride_h;
    b.out_shift_w = (b.phase_w + a.pad_w - b.first_w * a.dil_w) / a.stride_w;
    b.out_step_h = b.step_h * a.dil_h / a.stride_h;
    b.out_step_w = b.step_w * a.dil_w / a.stride_w;
    b.m_size = a.batch * b.rows * b.cols;
    b.n_size = a.cin_g;
    b.k_end = count_h * b.count_w * a.cout_g;
    return b;
  }
  // Input pixel m = (image, i, j) of the phase, at (phase_h + i * stride_h, phase_w + j * stride_w).
  __host__ __device__ static Radix pixel_radix(const Block& b) { return {b.rows, b.cols}; }
  // k = (phase tap row, phase tap column, cout): taps move up and left in grad_out
  __host__ __device__ static Radix k_radix(const ConvArgs& a, const Block& b) { return {b.count_w, a.cout_g}; }
  __host__ __device__ static Point m_part(const ConvArgs& a, const Block& b, int m) {
    if (m >= b.m_size) return {0, -1, 0};  // gathers nothing: taps only move up
    const Digits pixel = pixel_radix(b).split(m);
    const int h = pixel.mid + b.out_shift_h, w = pixel.lo + b.out_shift_w;
    return {pixel.hi * a.g.sn + h * a.g.sh + w * a.g.sw + int64_t{b.group} * a.cout_g * a.g.sc, h, w};
  }
  __host__ __device__ static int64_t n_part(const ConvArgs& a, const Block& b, int n) {
    return n < b.n_size ? int64_t{b.group} * a.cout_g * a.w.sn + n * a.w.sc : -1;
  }
  __host__ __device__ static WindowTap k_part(const ConvArgs& a, const Block& b, const Digits& k_digits, int k) {
    if (k >= b.k_end) return {{0, 0, 0}, 0, false};
    const int co = k_digits.lo, h = -k_digits.hi * b.out_step_h, w = -k_digits.mid * b.out_step_w;
    const int kh = b.first_h + k_digits.hi * b.step_h, kw = b.first_w + k_digits.mid * b.step_w;
    return {{h * a.g.sh + w * a.g.sw + co * a.g.sc, h, w}, co * a.w.sn + kh * a.w.sh + kw * a.w.sw, true};
  }
  __host__ __device__ static int64_t a_offset(const ConvArgs& a, const Block&, const Point& m, const WindowTap& k) {
    return k.a_offset(m, a.out_h, a.out_w);
  }
  __host__ __device__ static int64_t b_offset(const ConvArgs&, const Block&, int64_t n, const WindowTap& k) {
    return k.b_offset(n);
  }
  template <typename T>
  __device__ static void store(const ConvArgs& a, const Block& b, int m, int n, float v) {
    const Digits pixel = pixel_radix(b).split(m);
    const int img = pixel.hi, ih = b.phase_h + pixel.mid * a.stride_h, iw = b.phase_w + pixel.lo * a.stride_w;
    static_cast<T*>(a.dst)[img * a.dst_sn + static_cast<int64_t>(b.group * a.cin_g + n) * a.dst_sc + ih * a.dst_sh +
                           iw * a.dst_sw] = from_float<T>(v);
  }
};

// grad_weight^T: m = (tap, cin) column of the weight, n = cout of the group, k = output pixel.
struct WeightGradOp {
  static constexpr bool kTransposed = true;  // A tile [k][m], B tile [k][n]: M and N are contiguous
  static constexpr bool kMaskA = false, kMaskB = true;
  static constexpr bool kPooled = false;
  struct MPart {  // the input element (tap, cin) relative to a window origin
    Point tap;
    bool inside;
  };
  using NPart = int64_t;  // output channel n's offset in grad_out, -1 past n_size
  struct KPart {          // output pixel k: its window origin in the input and its offset in grad_out
    Point origin;
    int64_t grad;
    bool inside;
  };
  __device__ static const void* a_data(const ConvArgs& a) { return a.x.data; }
  __device__ static const void* b_data(const ConvArgs& a) { return a.g.data; }

  __host__ __device__ static Block block(const ConvArgs& a, int group, int slice) {
    Block b{};
    b.group = group;
    b.slice = slice;
    b.m_size = a.kh * a.kw * a.cin_g;
    b.n_size = a.cout_g;
    const int pixels = a.batch * a.out_h * a.out_w;
    b.k_begin = min(pixels, slice * a.slice_pixels);
    b.k_end = min(pixels, b.k_begin + a.slice_pixels);
    return b;
  }
  __host__ __device__ static Radix k_radix(const ConvArgs& a, const Block&) { return ForwardOp::pixel_radix(a); }
  __host__ __device__ static MPart m_part(const ConvArgs& a, const Block& b, int m) {
    if (m >= b.m_size) return {{0, 0, 0}, false};
    return {ForwardOp::tap(a, ForwardOp::k_radix(a, b).split(m)), true};
  }
  __host__ __device__ static int64_t n_part(const ConvArgs& a, const Block& b, int n) {
    return n < b.n_size ? static_cast<int64_t>(b.group * a.cout_g + n) * a.g.sc : -1;
  }
  __host__ __device__ static KPart k_part(const ConvArgs& a, const Block& b, const Digits& pixel, int k) {
    if (k >= b.k_end) return {{0, 0, 0}, 0, false};
    return {ForwardOp::origin(a, b, pixel.hi, pixel.mid, pixel.lo),
            pixel.hi * a.g.sn + pixel.mid * a.g.sh + pixel.lo * a.g.sw, true};
  }
  __host__ __device__ static int64_t a_offset(const ConvArgs& a, const Block&, const MPart& m, const KPart& k) {
    return m.inside && k.inside ? offset_inside(k.origin, m.tap, a.in_h, a.in_w) : -1;
  }
  __host__ __device__ static int64_t b_offset(const ConvArgs&, const Block&, int64_t n, const KPart& k) {
    return n >= 0 && k.inside ? n + k.grad : -1;
  }
  template <typename T>
  __device__ static void store(const ConvArgs& a, const Block& b, int m, int n, float v) {
    a.partial[(static_cast<int64_t>(b.slice) * a.groups + b.group) * b.m_size * b.n_size +
              static_cast<int64_t>(m) * b.n_size + n] = v;
  }
};

// Element (m, k) of A and (n, k) of B put together from their parts.
template <typename Op>
__host__ __device__ typename Op::KPart k_part_at(const ConvArgs& a, const Block& b, int k) {
  return Op::k_part(a, b, Op::k_radix(a, b).split(k), k);
}
template <typename Op>
__host__ __device__ int64_t a_offset_at(const ConvArgs& a, const Block& b, int m, int k) {
  return Op::a_offset(a, b, Op::m_part(a, b, m), k_part_at<Op>(a, b, k));
}
template <typename Op>
__host__ __device__ int64_t b_offset_at(const ConvArgs& a, const Block& b, int n, int k) {
  return Op::b_offset(a, b, Op::n_part(a, b, n), k_part_at<Op>(a, b, k));
}

// ---------------------------------------------------------------------------------------------
// The max-pool epilogue
// ---------------------------------------------------------------------------------------------

// torch's max-pool scan over a window in row-major order: a value replaces the maximum when greater
// or NaN, so ties keep the first position and NaN wins (the last NaN, as in torch).
struct WindowMax {
  float value = -INFINITY;
  int position = 0;
  __device__ void offer(float v, int p) {
    if (v > value || ::isnan(v)) {
      value = v;
      position = p;
    }
  }
};

// Writes the maximum of pooled pixel `pooled`, output channel n of the group, and its window position.
template <typename T>
__device__ void store_pooled(const ConvArgs& a, const Block& b, int pooled, int n, const WindowMax& best) {
  int img, ph, pw;
  PooledForwardOp::pooled_coords(a, pooled, img, ph, pw);
  const int64_t channel = b.group * a.cout_g + n;
  static_cast<T*>(a.dst)[img * a.dst_sn + channel * a.dst_sc + ph * a.dst_sh + pw * a.dst_sw] =
      from_float<T>(best.value);
  const PoolArgs& p = a.pool;
  const int64_t at = img * p.argmax_sn + channel * p.argmax_sc + ph * p.argmax_sh + pw * p.argmax_sw;
  switch (p.argmax_bytes) {  // uniform across the grid: one kernel serves the three argmax dtypes
    case 1: static_cast<int8_t*>(p.argmax)[at] = static_cast<int8_t>(best.position); break;
    case 2: static_cast<int16_t*>(p.argmax)[at] = static_cast<int16_t>(best.position); break;
    default: static_cast<int32_t*>(p.argmax)[at] = best.position; break;
  }
}

// The GEMM kernels' pooled epilogue. `tile` holds the block's activations (PooledForwardOp::activation)
// as [tile row][kCols channels], rows kLd apart. Consecutive threads take consecutive channels of one
// window: conflict-free shared reads and coalesced channels_last stores.
template <typename T, int kCols, int kLd, int kThreadCount>
__device__ void store_pooled_tile(const ConvArgs& a, const Block& b, int m0, int n0, const T* tile) {
  const int window = a.pool.kh * a.pool.kw;
  const int first = m0 / a.pool.tile_rows * a.pool.tile_windows;  // the tile's first pooled pixel
  for (int i = threadIdx.x; i < a.pool.tile_windows * kCols; i += kThreadCount) {
    const int w = i / kCols, c = i % kCols;
    const int pooled = first + w;
    if (pooled >= PooledForwardOp::pooled_pixels(a) || n0 + c >= b.n_size) continue;
    int img, ph, pw;
    PooledForwardOp::pooled_coords(a, pooled, img, ph, pw);
    WindowMax best;
    for (int position = 0; position < window; ++position) {
      int oh, ow;
      if (PooledForwardOp::window_pixel(a, ph, pw, position, oh, ow)) {
        best.offer(to_float(tile[(w * window + position) * kLd + c]), position);
      }
    }
    store_pooled<T>(a, b, pooled, n0 + c, best);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core implicit GEMM (fp16/bf16)
// ---------------------------------------------------------------------------------------------

// A tensor-core operand tile, [kRows][kCols] with the contiguous dim last (K, or M / N when
// transposed): thread tid loads chunks i = 0 .. kChunks-1 of kChunk elements at (row(tid, i), col(tid)),
// all in one column.
template <int Rows, int Cols>
struct OperandTile {
  static constexpr int kRows = Rows, kCols = Cols;
  static constexpr int kChunks = kRows * kCols / kChunk / kThreads;
  static_assert(kChunks * kChunk * kThreads == kRows * kCols && kThreads % (kCols / kChunk) == 0);
  __host__ __device__ static constexpr int row(int tid, int i) { return (tid + i * kThreads) / (kCols / kChunk); }
  __host__ __device__ static constexpr int col(int tid) { return tid % (kCols / kChunk) * kChunk; }
};

// The offsets of one thread's chunks of the A and B tiles, K tile after K tile. Each offset is an m (n)
// part and a k part: a chunk's row (or, transposed, the thread's column) fixes the m / n part for the
// whole K loop, computed once; k's digits advance by those of kBlockK. Transposed tiles have one k per
// chunk row; otherwise all chunks of A and B share the thread's column, one k whose part is computed
// once per tile. Elements 1..7 of a chunk (element-wise gathers) redo the moving part from scratch.
template <typename Op>
struct ChunkOffsets {
  static constexpr bool kTr = Op::kTransposed;
  using ATile = OperandTile<kTr ? kBlockK : kBlockM, kTr ? kBlockM : kBlockK>;
  using BTile = OperandTile<kTr ? kBlockK : kBlockN, kTr ? kBlockN : kBlockK>;
  static_assert(kTr || ATile::kCols == BTile::kCols, "A and B chunks share the thread's K column");
  static constexpr int kKs = kTr ? ATile::kChunks + BTile::kChunks : 1;  // A's rows, then B's

  int tid, m0, n0, k0;  // k0: the current K tile's first k
  Radix radix;
  Digits step;  // split(kBlockK)
  typename Op::MPart a_fixed[kTr ? 1 : ATile::kChunks];
  typename Op::NPart b_fixed[kTr ? 1 : BTile::kChunks];
  Digits k_digits[kKs];
  typename Op::KPart k_shared;  // not transposed: the k part of every chunk

  // k_tiles = 0: the radix may have a zero size and is not used
  __host__ __device__ ChunkOffsets(const ConvArgs& args, const Block& blk, int tid_, int m0_, int n0_, int k_tiles)
      : tid(tid_), m0(m0_), n0(n0_), k0(blk.k_begin), radix(Op::k_radix(args, blk)) {
    step = k_tiles > 0 ? radix.split(kBlockK) : Digits{};
    for (int i = 0; i < kKs; ++i) k_digits[i] = k_tiles > 0 ? radix.split(k_of(i)) : Digits{};
    if constexpr (kTr) {
      a_fixed[0] = Op::m_part(args, blk, m0 + ATile::col(tid));
      b_fixed[0] = Op::n_part(args, blk, n0 + BTile::col(tid));
    } else {
      for (int i = 0; i < ATile::kChunks; ++i) a_fixed[i] = Op::m_part(args, blk, m0 + ATile::row(tid, i));
      for (int i = 0; i < BTile::kChunks; ++i) b_fixed[i] = Op::n_part(args, blk, n0 + BTile::row(tid, i));
      k_shared = Op::k_part(args, blk, k_digits[0], k_of(0));
    }
  }
  __host__ __device__ int k_of(int i) const {
    if constexpr (kTr) {
      return k0 + (i < ATile::kChunks ? ATile::row(tid, i) : BTile::row(tid, i - ATile::kChunks));
    } else {
      return k0 + ATile::col(tid);
    }
  }
  // Element e of A chunk i of the current K tile (-1: reads zero).
  __host__ __device__ int64_t a(const ConvArgs& args, const Block& blk, int i, int e) const {
    if constexpr (kTr) {
      const auto m = e == 0 ? a_fixed[0] : Op::m_part(args, blk, m0 + ATile::col(tid) + e);
      return Op::a_offset(args, blk, m, Op::k_part(args, blk, k_digits[i], k_of(i)));
    } else {
      return Op::a_offset(args, blk, a_fixed[i], e == 0 ? k_shared : k_part_at<Op>(args, blk, k_of(0) + e));
    }
  }
  __host__ __device__ int64_t b(const ConvArgs& args, const Block& blk, int i, int e) const {
    if constexpr (kTr) {
      const int j = ATile::kChunks + i;
      const auto n = e == 0 ? b_fixed[0] : Op::n_part(args, blk, n0 + BTile::col(tid) + e);
      return Op::b_offset(args, blk, n, Op::k_part(args, blk, k_digits[j], k_of(j)));
    } else {
      return Op::b_offset(args, blk, b_fixed[i], e == 0 ? k_shared : k_part_at<Op>(args, blk, k_of(0) + e));
    }
  }
  __host__ __device__ void next_tile(const ConvArgs& args, const Block& blk) {
    k0 += kBlockK;
    for (int i = 0; i < kKs; ++i) k_digits[i] = radix.add(k_digits[i], step);
    if constexpr (!kTr) k_shared = Op::k_part(args, blk, k_digits[0], k_of(0));
  }
};

// One 8-element chunk of an operand tile. `offset(e)` locates element e of the chunk (-1 = zero).
// async: one cp.async of 16 bytes straight to shared memory (only the first element is located: the
// host guarantees the 8 share a pixel and a tap). Otherwise into `staged` (registers), 16 bytes at a
// time when `vec`, else element by element, and masked by relu_out > 0 when `mask` is set.
template <typename T, typename Offset>
__device__ __forceinline__ void fetch_chunk(uint4& staged, uint32_t smem_dst, const T* src, const T* mask, bool vec,
                                            bool async, Offset offset) {
  if (async) {
    const int64_t o = offset(0);
    cp_async_16(smem_dst, o >= 0 ? src + o : src, o >= 0);
    return;
  }
  uint32_t words[4] = {0u, 0u, 0u, 0u};
  if (vec) {
    const int64_t o = offset(0);
    if (o >= 0) {
      const uint4 v = *reinterpret_cast<const uint4*>(src + o);
      words[0] = v.x;
      words[1] = v.y;
      words[2] = v.z;
      words[3] = v.w;
      if (mask != nullptr) {
        const uint4 keep = *reinterpret_cast<const uint4*>(mask + o);
        const uint32_t keep_words[4] = {keep.x, keep.y, keep.z, keep.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t lo = positive_bits<T>(keep_words[i]) ? 0x0000ffffu : 0u;
          const uint32_t hi = positive_bits<T>(keep_words[i] >> 16) ? 0xffff0000u : 0u;
          words[i] &= lo | hi;
        }
      }
    }
  } else {
    const uint16_t* src_bits = reinterpret_cast<const uint16_t*>(src);
    const uint16_t* mask_bits = reinterpret_cast<const uint16_t*>(mask);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const int64_t o = offset(e);
      uint32_t bits = 0u;
      if (o >= 0) {
        bits = src_bits[o];
        if (mask_bits != nullptr && !positive_bits<T>(mask_bits[o])) bits = 0u;
      }
      words[e / 2] |= bits << (16 * (e % 2));
    }
  }
  staged = make_uint4(words[0], words[1], words[2], words[3]);
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads) conv_mma_kernel(const ConvArgs args) {
  constexpr bool kTr = Op::kTransposed;
  using Offsets = ChunkOffsets<Op>;
  using ATile = typename Offsets::ATile;
  using BTile = typename Offsets::BTile;
  // shared tiles are [rows][ld], the contiguous dim last, padded by 16 bytes so that the 8 row
  // addresses of every ldmatrix phase fall into distinct bank groups
  constexpr int kARows = ATile::kRows, kACols = ATile::kCols, kBRows = BTile::kRows, kBCols = BTile::kCols;
  constexpr int kLdA = kACols + 8, kLdB = kBCols + 8;
  constexpr int kAChunks = ATile::kChunks, kBChunks = BTile::kChunks;
  VKERNELS_SHARED(alignas(16) uint16_t, smem_a, [2][kARows * kLdA]);
  VKERNELS_SHARED(alignas(16) uint16_t, smem_b, [2][kBRows * kLdB]);

  const Block blk = Op::block(args, blockIdx.y, blockIdx.z);
  const int n_tiles = ceil_div(blk.n_size, kBlockN);
  const int m0 = static_cast<int>(blockIdx.x / n_tiles) * kBlockM;
  const int n0 = static_cast<int>(blockIdx.x % n_tiles) * kBlockN;
  if (m0 >= blk.m_size) return;  // the input-gradient grid is sized for the largest phase

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const T* a_src = static_cast<const T*>(Op::a_data(args));
  const T* b_src = static_cast<const T*>(Op::b_data(args));
  const T* a_mask = Op::kMaskA ? static_cast<const T*>(args.relu_out) : nullptr;
  const T* b_mask = Op::kMaskB ? static_cast<const T*>(args.relu_out) : nullptr;
  const bool a_async = args.vec_a && a_mask == nullptr;
  const bool b_async = args.vec_b && b_mask == nullptr;
  const int k_tiles = blk.k_end > blk.k_begin ? ceil_div(blk.k_end - blk.k_begin, kBlockK) : 0;

  uint4 a_staged[kAChunks], b_staged[kBChunks];
  Offsets offsets(args, blk, tid, m0, n0, k_tiles);

  // Starts the loads of the next K tile into `stage`: cp.async chunks land by themselves, staged ones
  // wait in registers for store_staged.
  auto issue = [&](int stage) {
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      fetch_chunk<T>(a_staged[i], smem_u32(&smem_a[stage][ATile::row(tid, i) * kLdA + ATile::col(tid)]), a_src,
                     a_mask, args.vec_a, a_async, [&](int e) { return offsets.a(args, blk, i, e); });
    }
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      fetch_chunk<T>(b_staged[i], smem_u32(&smem_b[stage][BTile::row(tid, i) * kLdB + BTile::col(tid)]), b_src,
                     b_mask, args.vec_b, b_async, [&](int e) { return offsets.b(args, blk, i, e); });
    }
    cp_async_commit();
    offsets.next_tile(args, blk);
  };
  auto store_staged = [&](int stage) {
    if (!a_async) {
#pragma unroll
      for (int i = 0; i < kAChunks; ++i) {
        *reinterpret_cast<uint4*>(&smem_a[stage][ATile::row(tid, i) * kLdA + ATile::col(tid)]) = a_staged[i];
      }
    }
    if (!b_async) {
#pragma unroll
      for (int i = 0; i < kBChunks; ++i) {
        *reinterpret_cast<uint4*>(&smem_b[stage][BTile::row(tid, i) * kLdB + BTile::col(tid)]) = b_staged[i];
      }
    }
  };

  float acc[4][4][4] = {};
  if (k_tiles > 0) {
    issue(0);
    store_staged(0);
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // one barrier publishes tile kt and proves everyone is done reading the other stage (kt - 1)
    cp_async_wait_all();
    __syncthreads();
    const bool more = kt + 1 < k_tiles;
    if (more) issue((kt + 1) % 2);
    const uint32_t a_base = smem_u32(smem_a[kt % 2]), b_base = smem_u32(smem_b[kt % 2]);
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int m = warp_m * 64 + mt * 16;
        if constexpr (kTr) {
          ldmatrix_x4_trans(af[mt], a_base + (kk * kLdA + m) * 2 + b_lane_offset<kLdA>(lane));
        } else {
          ldmatrix_x4(af[mt], a_base + (m * kLdA + kk) * 2 + a_lane_offset<kLdA>(lane));
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = warp_n * 32 + j * 16;
        if constexpr (kTr) {
          ldmatrix_x4_trans(bf[j], b_base + (kk * kLdB + n) * 2 + a_lane_offset<kLdB>(lane));
        } else {
          ldmatrix_x4(bf[j], b_base + (n * kLdB + kk) * 2 + b_lane_offset<kLdB>(lane));
        }
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          mma_16816<T>(acc[mt][nt], af[mt], bf[nt / 2][(nt % 2) * 2], bf[nt / 2][(nt % 2) * 2 + 1]);
        }
      }
    }
    if (more) store_staged((kt + 1) % 2);
  }

  const int g = lane / 4, t = lane % 4;
  if constexpr (Op::kPooled) {
    // A window's rows lie in several threads and warps: stage the activations in the operand buffers,
    // free once every warp has passed its last MMA (padded rows: conflict-free fragment stores).
    constexpr int kLdTile = kBlockN + 8;
    static_assert(kBlockM * kLdTile <= sizeof(smem_a) / sizeof(uint16_t));
    T* tile = reinterpret_cast<T*>(&smem_a[0][0]);
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp_m * 64 + mt * 16 + g + half * 8;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = warp_n * 32 + nt * 8 + 2 * t + e;
            if (n0 + c < blk.n_size) {
              tile[r * kLdTile + c] = Op::template activation<T>(args, blk, n0 + c, acc[mt][nt][half * 2 + e]);
            }
          }
        }
      }
    }
    __syncthreads();
    store_pooled_tile<T, kBlockN, kLdTile, kThreads>(args, blk, m0, n0, tile);
  } else {
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = m0 + warp_m * 64 + mt * 16 + g + half * 8;
        if (m >= blk.m_size) continue;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int n = n0 + warp_n * 32 + nt * 8 + 2 * t + e;
            if (n < blk.n_size) Op::template store<T>(args, blk, m, n, acc[mt][nt][half * 2 + e]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Plain-FMA implicit GEMM (fp32, exact) and the direct forward for few channels per group
// ---------------------------------------------------------------------------------------------

template <typename Op>
__global__ void __launch_bounds__(kSimtThreads) conv_fma_kernel(const ConvArgs args) {
  VKERNELS_SHARED(float, tile_a, [kSimtK][kSimtM + 4]);
  VKERNELS_SHARED(float, tile_b, [kSimtK][kSimtN + 4]);
  const Block blk = Op::block(args, blockIdx.y, blockIdx.z);
  const int n_tiles = ceil_div(blk.n_size, kSimtN);
  const int m0 = static_cast<int>(blockIdx.x / n_tiles) * kSimtM;
  const int n0 = static_cast<int>(blockIdx.x % n_tiles) * kSimtN;
  if (m0 >= blk.m_size) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const float* a_src = static_cast<const float*>(Op::a_data(args));
  const float* b_src = static_cast<const float*>(Op::b_data(args));
  const float* a_mask = Op::kMaskA ? static_cast<const float*>(args.relu_out) : nullptr;
  const float* b_mask = Op::kMaskB ? static_cast<const float*>(args.relu_out) : nullptr;

  float acc[4][4] = {};
  for (int k0 = blk.k_begin; k0 < blk.k_end; k0 += kSimtK) {
#pragma unroll
    for (int i = 0; i < kSimtM * kSimtK / kSimtThreads; ++i) {
      // consecutive threads walk the operand's contiguous dim (K, or M/N when transposed)
      const int e = tid + i * kSimtThreads;
      const int kk = Op::kTransposed ? e / kSimtM : e % kSimtK;
      const int mm = Op::kTransposed ? e % kSimtM : e / kSimtK;
      const int64_t o = a_offset_at<Op>(args, blk, m0 + mm, k0 + kk);
      tile_a[kk][mm] = o >= 0 && (a_mask == nullptr || a_mask[o] > 0.0f) ? a_src[o] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kSimtN * kSimtK / kSimtThreads; ++i) {
      const int e = tid + i * kSimtThreads;
      const int kk = Op::kTransposed ? e / kSimtN : e % kSimtK;
      const int nn = Op::kTransposed ? e % kSimtN : e / kSimtK;
      const int64_t o = b_offset_at<Op>(args, blk, n0 + nn, k0 + kk);
      tile_b[kk][nn] = o >= 0 && (b_mask == nullptr || b_mask[o] > 0.0f) ? b_src[o] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = tile_a[kk][ty * 4 + i];
        b[i] = tile_b[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  if constexpr (Op::kPooled) {
    // windows span threads: stage the activations (the operand tiles are too small to hold them)
    constexpr int kLdTile = kSimtN + 1;
    VKERNELS_SHARED(float, tile, [kSimtM * kLdTile]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = tx * 4 + j;
        if (n0 + c < blk.n_size) {
          tile[(ty * 4 + i) * kLdTile + c] = Op::template activation<float>(args, blk, n0 + c, acc[i][j]);
        }
      }
    }
    __syncthreads();
    store_pooled_tile<float, kSimtN, kLdTile, kSimtThreads>(args, blk, m0, n0, tile);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + ty * 4 + i;
      if (m >= blk.m_size) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + tx * 4 + j;
        if (n < blk.n_size) Op::template store<float>(args, blk, m, n, acc[i][j]);
      }
    }
  }
}

// The conv (no bias) at output pixel (img, oh, ow), output channel n of the block's group.
template <typename T>
__device__ float conv_at(const ConvArgs& a, const Block& b, int img, int oh, int ow, int n) {
  const T* x = static_cast<const T*>(a.x.data);
  const T* w = static_cast<const T*>(a.w.data);
  const Point origin = ForwardOp::origin(a, b, img, oh, ow);
  const int64_t row = ForwardOp::n_part(a, b, n);
  const Radix radix = ForwardOp::k_radix(a, b);
  Digits digits{0, 0, 0};  // of k, counted up instead of divided out
  float acc = 0.0f;
  for (int k = 0; k < b.k_end; ++k, digits = radix.add(digits, {0, 0, 1})) {
    const WindowTap tap = ForwardOp::k_part(a, b, digits, k);
    const int64_t o = tap.a_offset(origin, a.in_h, a.in_w);
    if (o >= 0) acc = fmaf(to_float(x[o]), to_float(w[tap.b_offset(row)]), acc);
  }
  return acc;
}

// One thread per output (Op = ForwardOp) or pooled output (PooledForwardOp: the conv at each window
// position), channels fastest (coalesced NHWC stores): for depthwise-like convolutions, where a GEMM
// tile of at least 8 output channels per group would be mostly padding, and for pool windows larger
// than a GEMM tile.
template <typename T, typename Op>
__global__ void conv_direct_forward_kernel(const ConvArgs args, int64_t total) {
  const int cout = args.groups * args.cout_g;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int channel = static_cast<int>(index % cout);
    const int pixel = static_cast<int>(index / cout);
    const Block blk = ForwardOp::block(args, channel / args.cout_g, 0);
    const int n = channel % args.cout_g;
    if constexpr (Op::kPooled) {
      int img, ph, pw;
      Op::pooled_coords(args, pixel, img, ph, pw);
      WindowMax best;
      const int window = args.pool.kh * args.pool.kw;
      for (int position = 0; position < window; ++position) {
        int oh, ow;
        if (Op::window_pixel(args, ph, pw, position, oh, ow)) {
          best.offer(to_float(Op::template activation<T>(args, blk, n, conv_at<T>(args, blk, img, oh, ow, n))),
                     position);
        }
      }
      store_pooled<T>(args, blk, pixel, n, best);
    } else {
      const Digits at = ForwardOp::pixel_radix(args).split(pixel);
      Op::template store<T>(args, blk, pixel, n, conv_at<T>(args, blk, at.hi, at.mid, at.lo, n));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward helpers: grad_pre, channel sums (bias, depthwise weight), the depthwise input gradient, and
// the fixed-order sums of the slices
// ---------------------------------------------------------------------------------------------

// grad_pre[i] = grad[i] * act'(saved[i]) rounded to T (what the GEMMs then read), over tensors sharing
// one dense layout; for ReLU the masked grad_out.
template <typename T>
__global__ void activation_grad_kernel(const T* grad, const T* saved, T* grad_pre, int64_t total, Activation act,
                                       float slope) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    grad_pre[i] = from_float<T>(activation_grad(act, to_float(grad[i]), to_float(saved[i]), slope));
  }
}

// partial[slice, row, c] = the sum over the output pixels of slice blockIdx.y of args.g (NHWC-dense,
// masked by relu_out > 0 if set) at channel c; with_input (a depthwise weight gradient, row = tap =
// blockIdx.z), times the input element that tap reads for the pixel; without (row 0), the bias
// gradient. Block = 32 channels x 8 pixel lanes; lanes are added in lane order.
template <typename T>
__global__ void channel_sums_partial_kernel(const ConvArgs args, bool with_input, int pixels, int channels,
                                            int slice_pixels, float* partial) {
  VKERNELS_SHARED(float, sums, [8][33]);
  const int c = blockIdx.x * 32 + threadIdx.x, tap = blockIdx.z;
  // 64-bit: the last slice may end past pixels, and pixels may be close to 2^31
  const int64_t begin = int64_t{blockIdx.y} * slice_pixels;
  const int64_t end = begin + slice_pixels < pixels ? begin + slice_pixels : pixels;
  const T* g = static_cast<const T*>(args.g.data);
  const T* x = static_cast<const T*>(args.x.data);
  const T* mask = static_cast<const T*>(args.relu_out);
  float sum = 0.0f;
  if (c < channels && begin + threadIdx.y < end) {
    Block blk{};
    blk.group = c;  // depthwise: group c reads input channel c
    const Point tap_at = ForwardOp::tap(args, {tap / args.kw, tap % args.kw, 0});
    const Radix radix = ForwardOp::pixel_radix(args);
    const Digits step = radix.split(8);
    Digits pixel = radix.split(static_cast<int>(begin + threadIdx.y));
    for (int64_t p = begin + threadIdx.y; p < end; p += 8, pixel = radix.add(pixel, step)) {
      const int64_t o = p * channels + c;
      if (mask != nullptr && !(to_float(mask[o]) > 0.0f)) continue;
      float v = to_float(g[o]);
      if (with_input) {
        const int64_t at =
            offset_inside(ForwardOp::origin(args, blk, pixel.hi, pixel.mid, pixel.lo), tap_at, args.in_h, args.in_w);
        v = at >= 0 ? v * to_float(x[at]) : 0.0f;
      }
      sum += v;
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) total += sums[i][threadIdx.x];
    partial[(blockIdx.y * int64_t{gridDim.z} + tap) * channels + c] = total;
  }
}

// dst[c, row] = the sum over slices, in slice order, of partial[slice, row, c], written at
// c * sn + (row / kw) * sh + (row % kw) * sw: a (C, 1, KH, KW) weight gradient, or (sn = 1, kw = 1) the bias's.
template <typename T>
__global__ void channel_sums_finish_kernel(const float* partial, int slices, int rows, int channels, View4 dst, int kw) {
  const int64_t total = int64_t{rows} * channels;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(index % channels), row = static_cast<int>(index / channels);
    float sum = 0.0f;
    for (int s = 0; s < slices; ++s) sum += partial[s * total + index];
    static_cast<T*>(const_cast<void*>(dst.data))[c * dst.sn + row / kw * dst.sh + row % kw * dst.sw] = from_float<T>(sum);
  }
}

// grad_input of a depthwise conv, one thread per input element, channels fastest (coalesced NHWC): the
// sum over the taps that reach it, in tap order, gathered from args.g (masked by relu_out > 0 if set)
// with no atomics.
template <typename T>
__global__ void depthwise_input_grad_kernel(const ConvArgs args, int64_t total) {
  const T* g = static_cast<const T*>(args.g.data);
  const T* w = static_cast<const T*>(args.w.data);
  const T* mask = static_cast<const T*>(args.relu_out);
  const int channels = args.groups;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(index % channels);
    const Digits pixel = Radix{args.in_h, args.in_w}.split(static_cast<int>(index / channels));
    const int img = pixel.hi, ih = pixel.mid, iw = pixel.lo;
    float acc = 0.0f;
    for (int kh = 0; kh < args.kh; ++kh) {
      const int th = ih + args.pad_h - kh * args.dil_h;  // oh * stride_h when tap kh reaches ih
      if (th < 0 || th % args.stride_h != 0 || th / args.stride_h >= args.out_h) continue;
      for (int kw = 0; kw < args.kw; ++kw) {
        const int tw = iw + args.pad_w - kw * args.dil_w;
        if (tw < 0 || tw % args.stride_w != 0 || tw / args.stride_w >= args.out_w) continue;
        const int64_t o = img * args.g.sn + c * args.g.sc + th / args.stride_h * args.g.sh + tw / args.stride_w * args.g.sw;
        if (mask != nullptr && !(to_float(mask[o]) > 0.0f)) continue;
        acc = fmaf(to_float(g[o]), to_float(w[c * args.w.sn + kh * args.w.sh + kw * args.w.sw]), acc);
      }
    }
    static_cast<T*>(args.dst)[img * args.dst_sn + c * args.dst_sc + ih * args.dst_sh + iw * args.dst_sw] =
        from_float<T>(acc);
  }
}

// grad_weight[co, ci, kh, kw] (its own strides) = sum over slices, in order, of the partial
// (slice, group, (kh, kw, ci), co_g) sums.
template <typename T>
__global__ void weight_grad_finish_kernel(const float* partial, int slices, ConvArgs args, View4 grad_weight,
                                          int64_t total) {
  const int taps_cin = args.kh * args.kw * args.cin_g;
  const int64_t slice_stride = int64_t{args.groups} * taps_cin * args.cout_g;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    // index runs over (co, kh, kw, ci), ci fastest
    const int ci = static_cast<int>(index % args.cin_g);
    int64_t rest = index / args.cin_g;
    const int kw = static_cast<int>(rest % args.kw);
    rest /= args.kw;
    const int kh = static_cast<int>(rest % args.kh);
    const int co = static_cast<int>(rest / args.kh);
    const int group = co / args.cout_g, co_g = co % args.cout_g;
    const int64_t at = (int64_t{group} * taps_cin + (kh * args.kw + kw) * args.cin_g + ci) * args.cout_g + co_g;
    float sum = 0.0f;
    for (int s = 0; s < slices; ++s) sum += partial[s * slice_stride + at];
    static_cast<T*>(const_cast<void*>(grad_weight.data))[co * grad_weight.sn + ci * grad_weight.sc +
                                                         kh * grad_weight.sh + kw * grad_weight.sw] =
        from_float<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  launch_kernel(kernel, grid, block, 0, c10::cuda::getCurrentCUDAStream(), args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks of a grid-stride elementwise loop over `total` items.
dim3 elementwise_grid(int64_t total, int threads) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 20)));
}

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

View4 view_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// 16-byte gathers along the channel dim need: 16-bit elements, unit channel stride, 16-byte aligned
// data and strides of the other (non-singleton) dims, and chunks of 8 channels that stay inside a
// group (channels per group a multiple of 8).
bool vectorizable(const at::Tensor& t, int64_t channels_per_group) {
  if (t.element_size() != 2 || channels_per_group % kChunk != 0 || t.stride(1) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d : {0, 2, 3}) {
    if (t.size(d) > 1 && t.stride(d) % kChunk != 0) return false;
  }
  return true;
}

std::array<int, 2> int_pair(at::IntArrayRef values, const char* op, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, op, ": ", name, " must have two values, got ", values);
  for (const int64_t v : values) {
    TORCH_CHECK(v >= minimum && v <= kInt32Max, op, ": ", name, " must be in [", minimum, ", 2^31), got ", values);
  }
  return {static_cast<int>(values[0]), static_cast<int>(values[1])};
}

void check_device(const at::Tensor& t, const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}

void check_tensor_core_device(const at::Tensor& t, const char* op) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  TORCH_CHECK(major >= 8, op, ": float16/bfloat16 need a GPU of compute capability 8.0 or newer");
}

// Checks input and weight and the geometry, and fills everything of ConvArgs but the pointers.
ConvArgs check_geometry(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t out_h,
                        int64_t out_w, const char* op) {
  TORCH_CHECK(on_kernel_device(input), op, ": input must be a ", kKernelDevice, " tensor, got one on ", input.device());
  check_device(weight, input, op, "weight");
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (Cout, Cin/groups, KH, KW), got shape ", weight.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
              ": input must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, op, ": input and weight must share a dtype, got ", dtype, " and ",
              weight.scalar_type());
  const auto s = int_pair(stride, op, "stride", 1);
  const auto p = int_pair(padding, op, "padding", 0);
  const auto d = int_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1 && groups <= 65535, op, ": groups must be in [1, 65535], got ", groups);
  const int64_t cin = input.size(1), cout = weight.size(0);
  TORCH_CHECK(cin % groups == 0 && weight.size(1) * groups == cin, op, ": input has ", cin,
              " channels, which must equal weight.size(1) * groups = ", weight.size(1), " * ", groups);
  TORCH_CHECK(cout % groups == 0, op, ": weight has ", cout, " output channels, not divisible by groups = ", groups);
  TORCH_CHECK(out_h >= 0 && out_w >= 0, op, ": output size must be non-negative, got ", out_h, "x", out_w);
  const int64_t kh = weight.size(2), kw = weight.size(3);
  // every index the kernels form must fit in 32 bits (memory offsets are 64-bit)
  const int64_t pixels = std::max(input.size(0) * input.size(2) * input.size(3), input.size(0) * out_h * out_w);
  const int64_t reach_h = out_h * s[0] + kh * d[0] + p[0] + input.size(2);
  const int64_t reach_w = out_w * s[1] + kw * d[1] + p[1] + input.size(3);
  TORCH_CHECK(pixels <= kInt32Max && reach_h <= kInt32Max && reach_w <= kInt32Max &&
                  kh * kw * std::max(weight.size(1), cout / groups) <= kInt32Max && cout <= kInt32Max,
              op, ": sizes too large for 32-bit indexing: input ", input.sizes(), ", weight ", weight.sizes(),
              ", output ", out_h, "x", out_w);
  ConvArgs a{};
  a.batch = static_cast<int>(input.size(0));
  a.in_h = static_cast<int>(input.size(2));
  a.in_w = static_cast<int>(input.size(3));
  a.out_h = static_cast<int>(out_h);
  a.out_w = static_cast<int>(out_w);
  a.groups = static_cast<int>(groups);
  a.cin_g = static_cast<int>(weight.size(1));
  a.cout_g = static_cast<int>(cout / groups);
  a.kh = static_cast<int>(kh);
  a.kw = static_cast<int>(kw);
  a.stride_h = s[0];
  a.stride_w = s[1];
  a.pad_h = p[0];
  a.pad_w = p[1];
  a.dil_h = d[0];
  a.dil_w = d[1];
  return a;
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input, int64_t cout, const char* op) {
  if (!bias.has_value()) return;
  check_device(*bias, input, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout, op, ": bias must have shape (", cout, "), got ",
              bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias must have the input dtype ",
              input.scalar_type(), ", got ", bias->scalar_type());
}

// The forward GEMM's operands and output in args: NHWC input and OHWI weight (K = (kh, kw, cin) is
// contiguous per pixel and per output channel) and a contiguous bias. The returned copies must outlive
// the launch.
std::array<at::Tensor, 3> set_forward_operands(ConvArgs& args, const at::Tensor& input, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  args.x = view_of(x);
  args.w = view_of(w);
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.dst = out.data_ptr();
  args.dst_sn = out.stride(0);
  args.dst_sc = out.stride(1);
  args.dst_sh = out.stride(2);
  args.dst_sw = out.stride(3);
  args.vec_a = vectorizable(x, args.cin_g);
  args.vec_b = vectorizable(w, args.cin_g);
  return {x, w, b};
}

// Grid of a GEMM of m_size x n_size per (group, z): tiles along x, m-major so that neighbouring blocks
// share A rows.
dim3 gemm_grid(int64_t m_size, int64_t n_size, int block_m, int block_n, int64_t groups, int64_t z, const char* op) {
  const int64_t tiles = ((m_size + block_m - 1) / block_m) * ((n_size + block_n - 1) / block_n);
  TORCH_CHECK(tiles <= kInt32Max && z <= 65535, op, ": problem too large for one launch (", tiles, " tiles, ", z,
              " slices)");
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(groups), static_cast<unsigned>(z));
}

template <typename Op, typename T>
void launch_gemm(const ConvArgs& args, int64_t m_size, int64_t n_size, int64_t z, const char* op) {
  if constexpr (std::is_same_v<T, float>) {
    launch(conv_fma_kernel<Op>, gemm_grid(m_size, n_size, kSimtM, kSimtN, args.groups, z, op), dim3(kSimtThreads),
           args);
  } else {
    launch(conv_mma_kernel<T, Op>, gemm_grid(m_size, n_size, kBlockM, kBlockN, args.groups, z, op), dim3(kThreads),
           args);
  }
}

int multiprocessor_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

// ---------------------------------------------------------------------------------------------
// Ops (schemas in vkernels/ops/conv.py)
// ---------------------------------------------------------------------------------------------

using OptionalTensor = std::optional<at::Tensor>;

OptionalTensor some(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// The schema's activation name: its index in conv_common.ACTIVATIONS is the Activation.
Activation parse_activation(std::string_view name, const char* op) {
  constexpr std::array<const char*, 8> kNames{"none", "relu", "relu6", "leaky_relu", "hardswish", "silu", "gelu",
                                              "gelu_tanh"};
  size_t i = 0;
  while (i < kNames.size() && name != kNames[i]) ++i;
  TORCH_CHECK(i < kNames.size(), op, ": unknown activation '", std::string(name),
              "'; expected none, relu, relu6, leaky_relu, hardswish, silu, gelu or gelu_tanh");
  return static_cast<Activation>(i);
}

// (out, pre-activation if save_pre_activation): conv2d_cuda, and conv2d_relu_cuda's out.
std::tuple<at::Tensor, OptionalTensor> conv2d_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, at::IntArrayRef output_size, Activation activation, float negative_slope, bool save_pre_activation,
    const char* op) {
  TORCH_CHECK(output_size.size() == 2, op, ": output_size must have two values, got ", output_size);
  ConvArgs args =
      check_geometry(input, weight, stride, padding, dilation, groups, output_size[0], output_size[1], op);
  const int64_t cout = weight.size(0);
  const std::vector<int64_t> out_shape{input.size(0), cout, output_size[0], output_size[1]};
  check_bias(bias, input, cout, op);
  if (residual.has_value()) {
    check_device(*residual, input, op, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), op, ": residual must have the output shape ",
                at::IntArrayRef(out_shape), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), op, ": residual must have the input dtype ",
                input.scalar_type(), ", got ", residual->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(out_shape, input.options().memory_format(memory_format(is_channels_last(input))));
  const at::Tensor pre = save_pre_activation ? at::empty_like(out) : at::Tensor();  // dst's strides
  if (out.numel() == 0) return {out, some(pre)};
  const bool tensor_cores = input.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(input, op);

  const auto operands = set_forward_operands(args, input, weight, bias, out);
  args.residual = residual.has_value() ? view_of(*residual) : View4{nullptr, 0, 0, 0, 0};
  args.pre = pre.defined() ? pre.data_ptr() : nullptr;
  args.activation = activation;
  args.negative_slope = negative_slope;

  dispatch_dtype(input.scalar_type(), op, [&](auto element) {
    using T = decltype(element);
    if (args.cout_g < kChunk) {
      const int64_t total = out.numel();
      launch(conv_direct_forward_kernel<T, ForwardOp>, elementwise_grid(total, 256), dim3(256), args, total);
    } else {
      launch_gemm<ForwardOp, T>(args, int64_t{args.batch} * args.out_h * args.out_w, args.cout_g, 1, op);
    }
  });
  return {out, some(pre)};
}

at::Tensor conv2d_relu_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, at::IntArrayRef output_size) {
  return std::get<0>(conv2d_forward(input, weight, bias, residual, stride, padding, dilation, groups, output_size,
                                    Activation::kRelu, 0.0f, false, "conv2d_relu_cuda"));
}

std::tuple<at::Tensor, OptionalTensor> conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                   at::IntArrayRef output_size, std::string_view activation,
                                                   double negative_slope, bool save_pre_activation) {
  constexpr const char* op = "conv2d_cuda";
  return conv2d_forward(input, weight, bias, residual, stride, padding, dilation, groups, output_size,
                        parse_activation(activation, op), static_cast<float>(negative_slope), save_pre_activation, op);
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::IntArrayRef conv_output_size,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride, at::IntArrayRef pool_padding,
    at::IntArrayRef output_size) {
  constexpr const char* op = "conv2d_relu_maxpool2d_cuda";
  const auto conv_size = int_pair(conv_output_size, op, "conv_output_size", 0);
  ConvArgs args = check_geometry(input, weight, stride, padding, dilation, groups, conv_size[0], conv_size[1], op);
  const int64_t cout = weight.size(0);
  check_bias(bias, input, cout, op);
  const auto k = int_pair(pool_kernel_size, op, "pool_kernel_size", 1);
  const auto s = int_pair(pool_stride, op, "pool_stride", 1);
  const auto p = int_pair(pool_padding, op, "pool_padding", 0);
  const auto pooled = int_pair(output_size, op, "output_size", 0);
  TORCH_CHECK(2 * int64_t{p[0]} <= k[0] && 2 * int64_t{p[1]} <= k[1], op,
              ": pool_padding must be at most half the pool kernel, got ", pool_padding, " for ", pool_kernel_size);
  const int64_t window = int64_t{k[0]} * k[1];
  const int64_t pooled_pixels = input.size(0) * pooled[0] * pooled[1];
  // window positions, pooled pixels and the conv pixels under them are ints in the kernels
  TORCH_CHECK(window <= kInt32Max && pooled_pixels <= kInt32Max &&
                  int64_t{pooled[0]} * s[0] + k[0] + conv_size[0] <= kInt32Max &&
                  int64_t{pooled[1]} * s[1] + k[1] + conv_size[1] <= kInt32Max,
              op, ": sizes too large for 32-bit indexing: pool window ", pool_kernel_size, ", output ", output_size);

  const c10::cuda::CUDAGuard guard(input.device());
  const auto options = input.options().memory_format(memory_format(is_channels_last(input)));
  const std::vector<int64_t> out_shape{input.size(0), cout, pooled[0], pooled[1]};
  at::Tensor out = at::empty(out_shape, options);
  at::Tensor argmax = at::empty(out_shape, options.dtype(window_index_dtype(window)));
  if (out.numel() == 0) return {out, argmax};
  const bool tensor_cores = input.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(input, op);

  const auto operands = set_forward_operands(args, input, weight, bias, out);
  const int tile_rows = tensor_cores ? kBlockM : kSimtM;  // the block M of the kernel launch_gemm picks
  args.pool = {.kh = k[0], .kw = k[1], .stride_h = s[0], .stride_w = s[1], .pad_h = p[0], .pad_w = p[1],
               .out_h = pooled[0], .out_w = pooled[1], .tile_rows = tile_rows,
               .tile_windows = static_cast<int>(tile_rows / window), .argmax = argmax.data_ptr(),
               .argmax_bytes = static_cast<int>(argmax.element_size()), .argmax_sn = argmax.stride(0),
               .argmax_sc = argmax.stride(1), .argmax_sh = argmax.stride(2), .argmax_sw = argmax.stride(3)};

  dispatch_dtype(input.scalar_type(), op, [&](auto element) {
    using T = decltype(element);
    if (args.cout_g < kChunk || args.pool.tile_windows == 0) {
      const int64_t total = out.numel();
      launch(conv_direct_forward_kernel<T, PooledForwardOp>, elementwise_grid(total, 256), dim3(256), args, total);
    } else {
      const int64_t rows = (pooled_pixels + args.pool.tile_windows - 1) / args.pool.tile_windows * tile_rows;
      TORCH_CHECK(rows <= kInt32Max, op, ": ", rows, " GEMM rows (pooled pixels x window) exceed 32-bit indexing");
      launch_gemm<PooledForwardOp, T>(args, rows, args.cout_g, 1, op);
    }
  });
  return {out, argmax};
}

// Slices of a channel sum (bias, depthwise weight) over the output pixels: up to 256, each of at least
// 4096 pixels, so that a large reduction spreads over the GPU and each partial row is worth writing.
// Sums the pixels of args.g (and relu_out's mask; with_input, the input under each of `rows` taps) into
// dst[c, row] (see channel_sums_finish_kernel), in a fixed order.
template <typename T>
void launch_channel_sums(const ConvArgs& args, bool with_input, int rows, int64_t pixels, int64_t channels,
                         const View4& dst, int kw, const at::TensorOptions& options) {
  const int64_t slices = std::clamp<int64_t>(pixels / 4096, 1, 256);
  const int64_t slice_pixels = (pixels + slices - 1) / slices;
  at::Tensor partial = at::empty({slices, rows, channels}, options.dtype(at::kFloat));
  launch(channel_sums_partial_kernel<T>,
         dim3(static_cast<unsigned>((channels + 31) / 32), static_cast<unsigned>(slices), static_cast<unsigned>(rows)),
         dim3(32, 8), args, with_input, static_cast<int>(pixels), static_cast<int>(channels),
         static_cast<int>(slice_pixels), partial.data_ptr<float>());
  launch(channel_sums_finish_kernel<T>, elementwise_grid(rows * channels, 256), dim3(256),
         partial.const_data_ptr<float>(), static_cast<int>(slices), rows, static_cast<int>(channels), dst, kw);
}

// conv2d_backward_cuda; conv2d_relu_backward_cuda with saved = out and activation ReLU.
std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> conv2d_backward(
    const at::Tensor& grad_output, const OptionalTensor& saved, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 4> needs,
    bool channels_last, Activation activation, float negative_slope, const char* op) {
  TORCH_CHECK(grad_output.dim() == 4, op, ": grad_output must be 4-D (N, Cout, OH, OW), got shape ",
              grad_output.sizes());
  ConvArgs args = check_geometry(input, weight, stride, padding, dilation, groups, grad_output.size(2),
                                 grad_output.size(3), op);
  check_device(grad_output, input, op, "grad_output");
  TORCH_CHECK(saved.has_value() == (activation != Activation::kNone), op,
              ": saved (the output or the pre-activation) is given exactly when there is an activation");
  const std::vector<int64_t> out_shape{input.size(0), weight.size(0), grad_output.size(2), grad_output.size(3)};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape), op, ": grad_output must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output must have the input dtype ",
              input.scalar_type(), ", got ", grad_output.scalar_type());
  if (saved.has_value()) {
    check_device(*saved, input, op, "saved");
    TORCH_CHECK(saved->sizes() == at::IntArrayRef(out_shape) && saved->scalar_type() == input.scalar_type(), op,
                ": the saved output or pre-activation must have shape ", at::IntArrayRef(out_shape), " and dtype ",
                input.scalar_type(), ", got ", saved->sizes(), " and ", saved->scalar_type());
  }
  const bool need_input = needs[0], need_weight = needs[1], need_bias = needs[2], need_residual = needs[3];

  const c10::cuda::CUDAGuard guard(input.device());
  const auto options = input.options();
  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;
  if (need_input) grad_input = at::empty(input.sizes(), options.memory_format(memory_format(channels_last)));
  if (need_weight) grad_weight = at::empty(weight.sizes(), options.memory_format(memory_format(is_channels_last(weight))));
  if (need_bias) grad_bias = at::empty({weight.size(0)}, options);
  if (need_residual) grad_residual = at::empty(out_shape, options.memory_format(memory_format(channels_last)));
  auto result = [&]() -> std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> {
    return {some(grad_input), some(grad_weight), some(grad_bias), some(grad_residual)};
  };
  if (grad_output.numel() == 0) {  // nothing flows back: the sums are empty
    for (at::Tensor* grad : {&grad_input, &grad_weight, &grad_bias}) {
      if (grad->defined()) grad->zero_();
    }
    return result();
  }
  if (!(need_input || need_weight || need_bias || need_residual)) return result();
  const bool tensor_cores = input.scalar_type() != at::kFloat;
  if (tensor_cores) check_tensor_core_device(input, op);

  // grad_out and saved in one dense NHWC layout, so that one offset finds both
  at::Tensor g = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor s = saved.has_value() ? saved->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  // ReLU's mask is applied as the kernels load grad_out, unless grad_residual must hold it anyway; other
  // activations write grad_pre first
  const bool mask_on_load = activation == Activation::kRelu && !need_residual;
  const int64_t pixels = int64_t{args.batch} * args.out_h * args.out_w;
  const int64_t cout = weight.size(0);
  // one input and one output channel per group: the direct kernels (grid z holds the weight's taps)
  const bool depthwise = args.cin_g == 1 && args.cout_g == 1 && int64_t{args.kh} * args.kw <= 65535;
  dispatch_dtype(input.scalar_type(), op, [&](auto element) {
    using T = decltype(element);
    if (activation != Activation::kNone && !mask_on_load) {
      at::Tensor grad_pre = need_residual && channels_last ? grad_residual : at::empty_like(g, at::MemoryFormat::ChannelsLast);
      const int64_t total = g.numel();
      launch(activation_grad_kernel<T>, elementwise_grid(total, 256), dim3(256), static_cast<const T*>(g.const_data_ptr()),
             static_cast<const T*>(s.const_data_ptr()), static_cast<T*>(grad_pre.mutable_data_ptr()), total, activation,
             negative_slope);
      g = grad_pre;
    }
    if (need_residual && !(channels_last && activation != Activation::kNone)) grad_residual.copy_(g);
    args.g = view_of(g);
    args.relu_out = mask_on_load ? s.const_data_ptr() : nullptr;

    if (need_bias) launch_channel_sums<T>(args, false, 1, pixels, cout, View4{grad_bias.data_ptr(), 1, 0, 0, 0}, 1, options);
    if (need_weight && grad_weight.numel() > 0) {
      if (input.numel() == 0) {
        grad_weight.zero_();
      } else {
        const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
        args.x = view_of(x);
        if (depthwise) {
          launch_channel_sums<T>(args, true, args.kh * args.kw, pixels, cout, view_of(grad_weight), args.kw, options);
        } else {
          args.vec_a = vectorizable(x, args.cin_g);
          args.vec_b = vectorizable(g, args.cout_g);
          const int64_t m_size = int64_t{args.kh} * args.kw * args.cin_g;
          const int block_m = tensor_cores ? kBlockM : kSimtM, block_n = tensor_cores ? kBlockN : kSimtN;
          const int64_t tiles = ((m_size + block_m - 1) / block_m) * ((args.cout_g + block_n - 1) / block_n) * groups;
          // enough blocks to fill the GPU twice, each slice long enough to amortise writing its partial
          int64_t slices = std::min<int64_t>((2 * multiprocessor_count(input) + tiles - 1) / tiles, pixels / 2048);
          slices = std::clamp<int64_t>(slices, 1, 1024);
          const int64_t quanta = (pixels + kSliceQuantum - 1) / kSliceQuantum;
          args.slice_pixels = static_cast<int>((quanta + slices - 1) / slices * kSliceQuantum);
          slices = (pixels + args.slice_pixels - 1) / args.slice_pixels;
          at::Tensor partial = at::empty({slices, groups, m_size, args.cout_g}, options.dtype(at::kFloat));
          args.partial = partial.data_ptr<float>();
          launch_gemm<WeightGradOp, T>(args, m_size, args.cout_g, slices, op);
          const int64_t total = grad_weight.numel();
          launch(weight_grad_finish_kernel<T>, elementwise_grid(total, 256), dim3(256), partial.const_data_ptr<float>(),
                 static_cast<int>(slices), args, view_of(grad_weight), total);
        }
      }
    }
    if (need_input && grad_input.numel() > 0) {
      args.dst = grad_input.data_ptr();
      args.dst_sn = grad_input.stride(0);
      args.dst_sc = grad_input.stride(1);
      args.dst_sh = grad_input.stride(2);
      args.dst_sw = grad_input.stride(3);
      if (depthwise) {
        args.w = view_of(weight);
        const int64_t total = grad_input.numel();
        launch(depthwise_input_grad_kernel<T>, elementwise_grid(total, 256), dim3(256), args, total);
      } else {
        // weight as [cin][kh][kw][cout] (cout stride 1): K = (tap, cout) is contiguous per input channel
        const at::Tensor w = weight.permute({1, 2, 3, 0}).contiguous().permute({3, 0, 1, 2});
        args.w = view_of(w);
        args.vec_a = vectorizable(g, args.cout_g);
        args.vec_b = args.cout_g % kChunk == 0 && tensor_cores &&
                     reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && w.stride(0) == 1;
        const int64_t rows = (args.in_h + args.stride_h - 1) / args.stride_h;  // phase 0 has the most pixels
        const int64_t cols = (args.in_w + args.stride_w - 1) / args.stride_w;
        launch_gemm<InputGradOp, T>(args, int64_t{args.batch} * rows * cols, args.cin_g,
                                    int64_t{args.stride_h} * args.stride_w, op);
      }
    }
  });
  return result();
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> conv2d_relu_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> needs, bool channels_last) {
  return conv2d_backward(grad_output, output, input, weight, stride, padding, dilation, groups, needs, channels_last,
                         Activation::kRelu, 0.0f, "conv2d_relu_backward_cuda");
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const OptionalTensor& saved, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> needs, bool channels_last, std::string_view activation, double negative_slope) {
  constexpr const char* op = "conv2d_backward_cuda";
  return conv2d_backward(grad_output, saved, input, weight, stride, padding, dilation, groups, needs, channels_last,
                         parse_activation(activation, op), static_cast<float>(negative_slope), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(vkernels, VKERNELS_DISPATCH_KEY, m) {
  m.impl("conv2d_cuda", &conv2d_cuda);
  m.impl("conv2d_backward_cuda", &conv2d_backward_cuda);
  m.impl("conv2d_relu_cuda", &conv2d_relu_cuda);
  m.impl("conv2d_relu_backward_cuda", &conv2d_relu_backward_cuda);
  m.impl("conv2d_relu_maxpool2d_cuda", &conv2d_relu_maxpool2d_cuda);
}

}  // namespace vkernels
