// CUDA kernels of the pooling ops. The schemas are defined in Python (vkernels/ops/pooling.py);
// this file only registers CUDA implementations for them, and the semantics follow DESIGN's pooling
// contract: torch's window, divisor and max/NaN rules, any input strides, deterministic backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "pool_window.cuh"
#include "runtime.cuh"

namespace vkernels {
namespace {

using at::cuda::detail::IntDivider;

constexpr int kThreadsPerBlock = 256;
constexpr int kVectorBytes = 16;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Vec consecutive channels moved by one aligned load or store (16 bytes for the value dtypes).
template <typename T, int Vec>
struct alignas(sizeof(T) * Vec) Pack {
  T v[Vec];
};

struct Strides {
  int64_t n, c, h, w;
};

// One window along one axis: positions origin + i * step for taps i in [begin, end). `padded` is the
// extent torch's avg_pool divides by when count_include_pad.
struct Taps {
  int origin, step, begin, end, padded;
};

// Outputs [lo, hi) whose window may hold a given input position.
struct Candidates {
  int lo, hi;
};

// Host description of one axis; adaptive pooling uses only in_size and out_size.
struct AxisSpec {
  int kernel, stride, pad, dilation, in_size, out_size;
};

// Max/avg pooling axis. IndexT is uint32_t when every dividend fits in 31 bits, so that divisions
// are magic-number multiplies instead of the ~20-instruction integer division.
template <typename IndexT>
struct SlidingAxis {
  int kernel, stride, pad, dilation, in_size, out_size;
  IntDivider<IndexT> by_stride, by_dilation;

  explicit SlidingAxis(const AxisSpec& a)
      : kernel(a.kernel),
        stride(a.stride),
        pad(a.pad),
        dilation(a.dilation),
        in_size(a.in_size),
        out_size(a.out_size),
        by_stride(a.stride),
        by_dilation(a.dilation) {}

  // Positions stay below 2^31 (checked on the host); products of sizes do not appear here.
  static bool fits_31_bits(const AxisSpec&) { return true; }

  __device__ int ceil_div(int x, const IntDivider<IndexT>& d) const {
    return static_cast<int>(d.div(static_cast<IndexT>(x + static_cast<int>(d.divisor) - 1)));
  }

  __device__ Taps taps(int o) const {
    const int origin = o * stride - pad;
    // Windows fully inside the input (the common case) skip both divisions.
    const int begin = origin >= 0 ? 0 : ceil_div(-origin, by_dilation);
    const int end = origin + (kernel - 1) * dilation < in_size ? kernel
                    : origin >= in_size                        ? 0
                                                               : min(kernel, ceil_div(in_size - origin, by_dilation));
    return {origin, dilation, begin, end, min(origin + kernel, in_size + pad) - origin};
  }

  __device__ Candidates outputs(int i) const {
    const int reach = i + pad;  // = o * stride + tap * dilation for every window holding i
    const int span = (kernel - 1) * dilation;
    const int lo = reach > span ? ceil_div(reach - span, by_stride) : 0;
    return {lo, min(out_size, static_cast<int>(by_stride.div(static_cast<IndexT>(reach))) + 1)};
  }

  // Tap of output o's window that lands on input position i, or -1 when dilation steps over i.
  __device__ int tap(int i, int o) const {
    const int distance = i + pad - o * stride;
    if (dilation == 1) return distance;
    const auto q = by_dilation.divmod(static_cast<IndexT>(distance));
    return q.mod == 0 ? static_cast<int>(q.div) : -1;
  }
};

// Adaptive pooling axis: window o is [floor(o * in / out), ceil((o + 1) * in / out)).
template <typename IndexT>
struct AdaptiveAxis {
  int in_size, out_size;
  IntDivider<IndexT> by_in, by_out;

  explicit AdaptiveAxis(const AxisSpec& a)
      : in_size(a.in_size), out_size(a.out_size), by_in(a.in_size), by_out(a.out_size) {}

  static bool fits_31_bits(const AxisSpec& a) {
    return int64_t{a.in_size} * a.out_size + a.in_size + a.out_size <= kInt32Max;
  }

  __device__ Taps taps(int o) const {
    const IndexT o_index = static_cast<IndexT>(o);
    const int start = static_cast<int>(by_out.div(o_index * in_size));
    const int stop = static_cast<int>(by_out.div((o_index + 1) * in_size + out_size - 1));
    return {start, 1, 0, stop - start, stop - start};
  }

  __device__ Candidates outputs(int i) const {
    const IndexT i_index = static_cast<IndexT>(i);
    return {static_cast<int>(by_in.div(i_index * out_size)),
            static_cast<int>(by_in.div((i_index + 1) * out_size + in_size - 1))};
  }
};

struct PoolSpec {
  AxisSpec h, w;
  bool count_include_pad;
  int64_t divisor_override;  // 0: none (torch rejects a zero divisor)
};

template <typename Axis, bool IsMax>
struct Pool2d {
  static constexpr bool kIsMax = IsMax;
  Axis h, w;
  int kernel_w;  // row length of the argmax offset i * kernel_w + j
  bool count_include_pad;
  int64_t divisor_override;

  explicit Pool2d(const PoolSpec& s)
      : h(s.h),
        w(s.w),
        kernel_w(s.w.kernel),
        count_include_pad(s.count_include_pad),
        divisor_override(s.divisor_override) {}

  template <typename acc_t>
  __device__ acc_t divisor(const Taps& th, const Taps& tw) const {
    if (divisor_override != 0) return static_cast<acc_t>(divisor_override);
    if (count_include_pad) return static_cast<acc_t>(int64_t{th.padded} * tw.padded);
    return static_cast<acc_t>(int64_t{th.end - th.begin} * (tw.end - tw.begin));
  }
};

struct Coord {
  int n, c, h, w;
};

// Enumerates a (N, C, H, W) tensor in its memory order so that neighbouring threads touch
// neighbouring addresses; with channels_last one item is Vec consecutive channels.
template <typename IndexT>
struct MemoryOrder {
  IndexT items;
  IntDivider<IndexT> fastest, middle, slowest;  // NCHW: W, H, C; NHWC: C / Vec, W, H
  bool channels_last;

  template <int Vec>
  __device__ Coord decode(IndexT item) const {
    const auto a = fastest.divmod(item);
    const auto b = middle.divmod(a.div);
    const auto c = slowest.divmod(b.div);
    const int n = static_cast<int>(c.div);
    if (Vec > 1 || channels_last) {
      return {n, static_cast<int>(a.mod) * Vec, static_cast<int>(c.mod), static_cast<int>(b.mod)};
    }
    return {n, static_cast<int>(c.mod), static_cast<int>(b.mod), static_cast<int>(a.mod)};
  }
};

template <typename IndexT>
MemoryOrder<IndexT> memory_order(const at::Tensor& t, bool channels_last, int vec) {
  const auto s = t.sizes();
  const IndexT items = static_cast<IndexT>(t.numel() / vec);
  if (channels_last) return {items, IndexT(s[1] / vec), IndexT(s[3]), IndexT(s[2]), true};
  return {items, IndexT(s[3]), IndexT(s[2]), IndexT(s[1]), false};
}

// The argmax dtype (int8/16/32, chosen like shapes.window_index_dtype) is a runtime width: a
// warp-uniform switch keeps one kernel per value dtype instead of three.
template <typename T, int Vec>
__device__ void load_taps_as(const void* base, int64_t offset, int (&taps)[Vec]) {
  const auto p = *reinterpret_cast<const Pack<T, Vec>*>(static_cast<const T*>(base) + offset);
#pragma unroll
  for (int v = 0; v < Vec; ++v) taps[v] = p.v[v];
}

template <int Vec>
__device__ void load_taps(const void* base, int64_t offset, int bytes, int (&taps)[Vec]) {
  switch (bytes) {
    case 1: load_taps_as<int8_t>(base, offset, taps); break;
    case 2: load_taps_as<int16_t>(base, offset, taps); break;
    default: load_taps_as<int32_t>(base, offset, taps); break;
  }
}

template <typename T, int Vec>
__device__ void store_taps_as(void* base, int64_t pack_index, const int (&taps)[Vec]) {
  Pack<T, Vec> p;
#pragma unroll
  for (int v = 0; v < Vec; ++v) p.v[v] = static_cast<T>(taps[v]);
  reinterpret_cast<Pack<T, Vec>*>(base)[pack_index] = p;
}

template <int Vec>
__device__ void store_taps(void* base, int64_t pack_index, int bytes, const int (&taps)[Vec]) {
  switch (bytes) {
    case 1: store_taps_as<int8_t>(base, pack_index, taps); break;
    case 2: store_taps_as<int16_t>(base, pack_index, taps); break;
    default: store_taps_as<int32_t>(base, pack_index, taps); break;
  }
}

// Merge of two partial maxima, equal to torch's sequential scan (take when greater or NaN): a NaN
// beats any number and the later NaN wins; among equal numbers the earlier tap wins.
template <typename acc_t>
__device__ bool replaces(acc_t value, int tap, acc_t best, int best_tap) {
  if (::isnan(value)) return !::isnan(best) || tap > best_tap;
  return !::isnan(best) && (value > best || (value == best && tap < best_tap));
}

// One thread group of 2^group_log2 lanes per output item. Lanes split each window row; more than
// one lane only for NCHW with wide windows, where it turns strided per-thread rows into coalesced
// reads.
template <typename scalar_t, typename Pool, typename IndexT, int Vec>
__global__ void __launch_bounds__(kThreadsPerBlock)
    pool2d_forward_kernel(const scalar_t* __restrict__ input, Strides in, scalar_t* __restrict__ output,
                          void* __restrict__ argmax, int argmax_bytes, MemoryOrder<IndexT> order, int group_log2,
                          Pool pool) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t item = thread >> group_log2;
  if (item >= static_cast<int64_t>(order.items)) return;  // whole groups leave together
  const int group = 1 << group_log2;
  const int lane = static_cast<int>(thread) & (group - 1);

  const Coord o = order.template decode<Vec>(static_cast<IndexT>(item));
  const Taps th = pool.h.taps(o.h);
  const Taps tw = pool.w.taps(o.w);

  acc_t value[Vec];
  int best_tap[Vec];
#pragma unroll
  for (int v = 0; v < Vec; ++v) {
    value[v] = Pool::kIsMax ? static_cast<acc_t>(-INFINITY) : acc_t(0);
    best_tap[v] = th.begin * pool.kernel_w + tw.begin;  // torch reports the first valid tap of an all -inf window
  }

  // Pointer and tap advance incrementally: per-element 64-bit index math would dominate NCHW.
  const int first_j = tw.begin + lane;
  const scalar_t* row = input + o.n * in.n + o.c * in.c + int64_t{th.origin + th.begin * th.step} * in.h +
                        int64_t{tw.origin + first_j * tw.step} * in.w;
  const int64_t row_step = int64_t{th.step} * in.h;
  const int64_t lane_step = (int64_t{tw.step} * in.w) << group_log2;
  for (int i = th.begin; i < th.end; ++i, row += row_step) {
    const scalar_t* x = row;
    int tap = i * pool.kernel_w + first_j;
#pragma unroll 4
    for (int j = first_j; j < tw.end; j += group, x += lane_step, tap += group) {
      const auto pack = *reinterpret_cast<const Pack<scalar_t, Vec>*>(x);
#pragma unroll
      for (int v = 0; v < Vec; ++v) {
        const acc_t xv = static_cast<acc_t>(pack.v[v]);
        if constexpr (Pool::kIsMax) {
          if (xv > value[v] || ::isnan(xv)) {
            value[v] = xv;
            best_tap[v] = tap;
          }
        } else {
          value[v] += xv;
        }
      }
    }
  }

  if (group > 1) {
    const int lane_in_warp = threadIdx.x & 31;
    const unsigned mask = group == 32 ? 0xffffffffu : ((1u << group) - 1u) << (lane_in_warp & ~(group - 1));
    for (int delta = group / 2; delta > 0; delta /= 2) {
#pragma unroll
      for (int v = 0; v < Vec; ++v) {
        const acc_t other = __shfl_xor_sync(mask, value[v], delta, group);
        if constexpr (Pool::kIsMax) {
          const int other_tap = __shfl_xor_sync(mask, best_tap[v], delta, group);
          if (replaces(other, other_tap, value[v], best_tap[v])) {
            value[v] = other;
            best_tap[v] = other_tap;
          }
        } else {
          value[v] += other;
        }
      }
    }
    if (lane != 0) return;
  }

  Pack<scalar_t, Vec> result;
  if constexpr (Pool::kIsMax) {
#pragma unroll
    for (int v = 0; v < Vec; ++v) result.v[v] = static_cast<scalar_t>(value[v]);
    store_taps<Vec>(argmax, item, argmax_bytes, best_tap);
  } else {
    const acc_t divisor = pool.template divisor<acc_t>(th, tw);
#pragma unroll
    for (int v = 0; v < Vec; ++v) result.v[v] = static_cast<scalar_t>(value[v] / divisor);
  }
  reinterpret_cast<Pack<scalar_t, Vec>*>(output)[item] = result;
}

// Gather form: each grad_input item sums the grad_output entries of the windows that hold it, so
// there are no atomics and the result is deterministic.
template <typename scalar_t, typename Pool, typename IndexT, int Vec>
__global__ void __launch_bounds__(kThreadsPerBlock)
    pool2d_backward_kernel(const scalar_t* __restrict__ grad_output, Strides go, const void* __restrict__ argmax,
                           Strides am, int argmax_bytes, scalar_t* __restrict__ grad_input, MemoryOrder<IndexT> order,
                           Pool pool) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t item = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (item >= static_cast<int64_t>(order.items)) return;

  const Coord in = order.template decode<Vec>(static_cast<IndexT>(item));
  const Candidates rows = pool.h.outputs(in.h);
  const Candidates cols = pool.w.outputs(in.w);
  const int64_t grad_plane = in.n * go.n + in.c * go.c;
  const int64_t argmax_plane = in.n * am.n + in.c * am.c;

  acc_t grad[Vec] = {};
  for (int oh = rows.lo; oh < rows.hi; ++oh) {
    int tap_h = 0;
    Taps th{};
    if constexpr (Pool::kIsMax) {
      tap_h = pool.h.tap(in.h, oh);
      if (tap_h < 0) continue;
    } else {
      th = pool.h.taps(oh);
    }
    for (int ow = cols.lo; ow < cols.hi; ++ow) {
      const int64_t grad_offset = grad_plane + oh * go.h + ow * go.w;
      if constexpr (Pool::kIsMax) {
        const int tap_w = pool.w.tap(in.w, ow);
        if (tap_w < 0) continue;
        int taps[Vec];
        load_taps<Vec>(argmax, argmax_plane + oh * am.h + ow * am.w, argmax_bytes, taps);
        const int mine = tap_h * pool.kernel_w + tap_w;
        bool any = false;
#pragma unroll
        for (int v = 0; v < Vec; ++v) any |= taps[v] == mine;
        if (!any) continue;  // skips the grad_output load for most candidates
        const auto g = *reinterpret_cast<const Pack<scalar_t, Vec>*>(grad_output + grad_offset);
#pragma unroll
        for (int v = 0; v < Vec; ++v) {
          if (taps[v] == mine) grad[v] += static_cast<acc_t>(g.v[v]);
        }
      } else {
        // One division per window instead of one per channel; differs from g / divisor by <= 1 ulp.
        const acc_t scale = acc_t(1) / pool.template divisor<acc_t>(th, pool.w.taps(ow));
        const auto g = *reinterpret_cast<const Pack<scalar_t, Vec>*>(grad_output + grad_offset);
#pragma unroll
        for (int v = 0; v < Vec; ++v) grad[v] += static_cast<acc_t>(g.v[v]) * scale;
      }
    }
  }

  Pack<scalar_t, Vec> result;
#pragma unroll
  for (int v = 0; v < Vec; ++v) result.v[v] = static_cast<scalar_t>(grad[v]);
  reinterpret_cast<Pack<scalar_t, Vec>*>(grad_input)[item] = result;
}

// ---------------------------------------------------------------------------------------------
// Host side

bool is_channels_last(const at::Tensor& t) {
  // Same rule as shapes.is_channels_last: ambiguous layouts (C == 1, H == W == 1) count as NCHW.
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// True when `vec` consecutive channels of t can move as one aligned access.
bool channels_vectorizable(const at::Tensor& t, int vec) {
  if (t.size(1) % vec != 0 || t.stride(1) != 1) return false;
  for (int d : {0, 2, 3}) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (vec * t.element_size()) == 0;
}

// torch's Python names: c10 prints int8 as "Char".
const char* index_dtype_name(at::ScalarType dtype) {
  return dtype == at::kChar ? "torch.int8" : dtype == at::kShort ? "torch.int16" : "torch.int32";
}

void check_values(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D (N, C, H, W) ", name, ", got ", t.dim(), " dimensions");
  TORCH_CHECK(on_kernel_device(t), op, ": expected ", name, " on a ", kKernelDevice, " device, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected ", name, " of dtype float16, bfloat16, float32 or float64, got ", dtype);
  for (int64_t size : t.sizes()) {
    TORCH_CHECK(size <= kInt32Max, op, ": ", name, " sizes must be below 2^31, got ", t.sizes());
  }
}

void check_pool_input(const at::Tensor& input, const char* op) {
  check_values(input, op, "input");
  TORCH_CHECK(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
              ": expected non-empty C, H and W, got input of shape ", input.sizes());
}

std::array<int, 2> int_pair(at::IntArrayRef values, const char* op, const char* name, int64_t min_value) {
  TORCH_CHECK(values.size() == 2, op, ": ", name, " must have 2 elements, got ", values);
  for (int64_t v : values) {
    TORCH_CHECK(v >= min_value && v <= kInt32Max, op, ": ", name, " must be in [", min_value, ", 2^31), got ", values);
  }
  return {static_cast<int>(values[0]), static_cast<int>(values[1])};
}

// Kernels compute window positions in int: refuse geometries whose positions could overflow it.
void check_positions(const AxisSpec& a, const char* op) {
  const int64_t reach = int64_t{a.out_size} * a.stride + int64_t{a.kernel} * a.dilation + a.in_size + a.pad;
  TORCH_CHECK(reach <= kInt32Max, op, ": pooling geometry too large for 32-bit window positions");
}

std::array<AxisSpec, 2> sliding_axes(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, std::array<int64_t, 2> in_size,
                                     std::array<int64_t, 2> out_size, const char* op) {
  const auto k = int_pair(kernel_size, op, "kernel_size", 1);
  const auto s = int_pair(stride, op, "stride", 1);
  const auto p = int_pair(padding, op, "padding", 0);
  const auto d = int_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(int64_t{k[0]} * k[1] <= kInt32Max, op, ": kernel_size ", kernel_size, " has more than 2^31 taps");
  std::array<AxisSpec, 2> axes;
  for (int a = 0; a < 2; ++a) {
    axes[a] = {k[a], s[a], p[a], d[a], static_cast<int>(in_size[a]), static_cast<int>(out_size[a])};
    check_positions(axes[a], op);
  }
  return axes;
}

std::array<AxisSpec, 2> adaptive_axes(std::array<int64_t, 2> in_size, std::array<int64_t, 2> out_size) {
  std::array<AxisSpec, 2> axes;
  for (int a = 0; a < 2; ++a) axes[a] = {1, 1, 0, 1, static_cast<int>(in_size[a]), static_cast<int>(out_size[a])};
  return axes;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t threads, const Args&... args) {
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= kInt32Max, "vkernels pooling: tensor too large for one launch");
  launch_kernel(kernel, static_cast<unsigned>(blocks), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream(), args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 32-bit index math whenever every dividend fits in 31 bits (IntDivider's fast path needs that).
template <typename Body>
void with_index_type(bool fits_31_bits, Body&& body) {
  if (fits_31_bits) {
    body(uint32_t{});
  } else {
    body(int64_t{});
  }
}

// Lanes per NCHW output: a wide window row is read by adjacent lanes (coalesced) instead of each lane
// walking its own window far from its neighbours'. NHWC is coalesced across C already.
int forward_group_log2(bool channels_last, int64_t window_h, int64_t window_w) {
  if (channels_last || window_h * window_w < 16) return 0;
  int log2 = 0;
  while (log2 < 5 && (int64_t{1} << log2) < window_w) ++log2;
  return log2;
}

template <template <typename> class Axis, bool IsMax>
void pool2d_forward(const at::Tensor& input, const at::Tensor& output, const at::Tensor& argmax, bool channels_last,
                    const PoolSpec& spec, int64_t window_h, int64_t window_w) {
  const bool fits =
      output.numel() <= kInt32Max && Axis<int64_t>::fits_31_bits(spec.h) && Axis<int64_t>::fits_31_bits(spec.w);
  void* argmax_data = IsMax ? argmax.data_ptr() : nullptr;
  const int argmax_bytes = IsMax ? static_cast<int>(argmax.element_size()) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "pool2d_forward", [&] {
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const bool vectorized = channels_last && channels_vectorizable(input, kVec);
    const int group_log2 = vectorized ? 0 : forward_group_log2(channels_last, window_h, window_w);
    with_index_type(fits, [&](auto index) {
      using IndexT = decltype(index);
      using Pool = Pool2d<Axis<IndexT>, IsMax>;
      const int vec = vectorized ? kVec : 1;
      const auto order = memory_order<IndexT>(output, channels_last, vec);
      const int64_t threads = (output.numel() / vec) << group_log2;
      auto kernel = vectorized ? pool2d_forward_kernel<scalar_t, Pool, IndexT, kVec>
                               : pool2d_forward_kernel<scalar_t, Pool, IndexT, 1>;
      launch(kernel, threads, input.const_data_ptr<scalar_t>(), strides_of(input), output.mutable_data_ptr<scalar_t>(),
             argmax_data, argmax_bytes, order, group_log2, Pool(spec));
    });
  });
}

template <template <typename> class Axis, bool IsMax>
void pool2d_backward(const at::Tensor& grad_output, const at::Tensor& argmax, const at::Tensor& grad_input,
                     bool channels_last, const PoolSpec& spec) {
  const bool fits =
      grad_input.numel() <= kInt32Max && Axis<int64_t>::fits_31_bits(spec.h) && Axis<int64_t>::fits_31_bits(spec.w);
  const void* argmax_data = IsMax ? argmax.const_data_ptr() : nullptr;
  const int argmax_bytes = IsMax ? static_cast<int>(argmax.element_size()) : 0;
  const Strides argmax_strides = IsMax ? strides_of(argmax) : Strides{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "pool2d_backward", [&] {
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const bool vectorized =
        channels_last && channels_vectorizable(grad_output, kVec) && (!IsMax || channels_vectorizable(argmax, kVec));
    with_index_type(fits, [&](auto index) {
      using IndexT = decltype(index);
      using Pool = Pool2d<Axis<IndexT>, IsMax>;
      const int vec = vectorized ? kVec : 1;
      const auto order = memory_order<IndexT>(grad_input, channels_last, vec);
      auto kernel = vectorized ? pool2d_backward_kernel<scalar_t, Pool, IndexT, kVec>
                               : pool2d_backward_kernel<scalar_t, Pool, IndexT, 1>;
      launch(kernel, grad_input.numel() / vec, grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
             argmax_data, argmax_strides, argmax_bytes, grad_input.mutable_data_ptr<scalar_t>(), order, Pool(spec));
    });
  });
}

std::array<int64_t, 2> spatial(const at::Tensor& t) { return {t.size(2), t.size(3)}; }

at::Tensor empty_grad_input(const at::Tensor& grad_output, std::array<int, 2> input_size, bool channels_last) {
  return at::empty({grad_output.size(0), grad_output.size(1), input_size[0], input_size[1]},
                   grad_output.options().memory_format(memory_format(channels_last)));
}

// ---------------------------------------------------------------------------------------------
// Ops (schemas in vkernels/ops/pooling.py)

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, at::IntArrayRef output_size) {
  constexpr const char* op = "max_pool2d_cuda";
  check_pool_input(input, op);
  const auto out = int_pair(output_size, op, "output_size", 0);
  const auto axes = sliding_axes(kernel_size, stride, padding, dilation, spatial(input), {out[0], out[1]}, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool channels_last = is_channels_last(input);
  const auto options = input.options().memory_format(memory_format(channels_last));
  auto output = at::empty({input.size(0), input.size(1), out[0], out[1]}, options);
  auto argmax = at::empty(output.sizes(), options.dtype(window_index_dtype(int64_t{axes[0].kernel} * axes[1].kernel)));
  if (output.numel() > 0) {
    pool2d_forward<SlidingAxis, true>(input, output, argmax, channels_last, {axes[0], axes[1], false, 0},
                                      axes[0].kernel, axes[1].kernel);
  }
  return {output, argmax};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& argmax, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool channels_last) {
  constexpr const char* op = "max_pool2d_backward_cuda";
  check_values(grad_output, op, "grad_output");
  const auto in = int_pair(input_size, op, "input_size", 0);
  const auto axes = sliding_axes(kernel_size, stride, padding, dilation, {in[0], in[1]}, spatial(grad_output), op);
  const auto argmax_dtype = window_index_dtype(int64_t{axes[0].kernel} * axes[1].kernel);
  TORCH_CHECK(argmax.scalar_type() == argmax_dtype, op, ": expected argmax of dtype ", index_dtype_name(argmax_dtype),
              " for a ", axes[0].kernel, "x", axes[1].kernel, " window, got ", argmax.scalar_type());
  TORCH_CHECK(argmax.sizes() == grad_output.sizes(), op, ": argmax shape ", argmax.sizes(),
              " differs from grad_output shape ", grad_output.sizes());
  TORCH_CHECK(argmax.device() == grad_output.device(), op, ": argmax is on ", argmax.device(),
              " but grad_output is on ", grad_output.device());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  auto grad_input = empty_grad_input(grad_output, in, channels_last);
  if (grad_output.numel() == 0) return grad_input.zero_();  // no window reaches the input
  if (grad_input.numel() > 0) {
    pool2d_backward<SlidingAxis, true>(grad_output, argmax, grad_input, channels_last, {axes[0], axes[1], false, 0});
  }
  return grad_input;
}

at::Tensor avg_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef output_size, bool count_include_pad,
                           std::optional<int64_t> divisor_override) {
  constexpr const char* op = "avg_pool2d_cuda";
  check_pool_input(input, op);
  TORCH_CHECK(divisor_override.value_or(1) != 0, op, ": divisor must be not zero");
  const auto out = int_pair(output_size, op, "output_size", 0);
  const auto axes = sliding_axes(kernel_size, stride, padding, {1, 1}, spatial(input), {out[0], out[1]}, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool channels_last = is_channels_last(input);
  auto output = at::empty({input.size(0), input.size(1), out[0], out[1]},
                          input.options().memory_format(memory_format(channels_last)));
  if (output.numel() > 0) {
    pool2d_forward<SlidingAxis, false>(input, output, at::Tensor(), channels_last,
                                       {axes[0], axes[1], count_include_pad, divisor_override.value_or(0)},
                                       axes[0].kernel, axes[1].kernel);
  }
  return output;
}

at::Tensor avg_pool2d_backward_cuda(const at::Tensor& grad_output, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    bool count_include_pad, std::optional<int64_t> divisor_override,
                                    bool channels_last) {
  constexpr const char* op = "avg_pool2d_backward_cuda";
  check_values(grad_output, op, "grad_output");
  TORCH_CHECK(divisor_override.value_or(1) != 0, op, ": divisor must be not zero");
  const auto in = int_pair(input_size, op, "input_size", 0);
  const auto axes = sliding_axes(kernel_size, stride, padding, {1, 1}, {in[0], in[1]}, spatial(grad_output), op);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  auto grad_input = empty_grad_input(grad_output, in, channels_last);
  if (grad_output.numel() == 0) return grad_input.zero_();  // no window reaches the input
  if (grad_input.numel() > 0) {
    pool2d_backward<SlidingAxis, false>(grad_output, at::Tensor(), grad_input, channels_last,
                                        {axes[0], axes[1], count_include_pad, divisor_override.value_or(0)});
  }
  return grad_input;
}

at::Tensor adaptive_avg_pool2d_cuda(const at::Tensor& input, at::IntArrayRef output_size) {
  constexpr const char* op = "adaptive_avg_pool2d_cuda";
  check_pool_input(input, op);
  const auto out = int_pair(output_size, op, "output_size", 0);
  const auto axes = adaptive_axes(spatial(input), {out[0], out[1]});
  const c10::cuda::CUDAGuard guard(input.device());
  const bool channels_last = is_channels_last(input);
  auto output = at::empty({input.size(0), input.size(1), out[0], out[1]},
                          input.options().memory_format(memory_format(channels_last)));
  if (output.numel() > 0) {
    const int64_t window_h = (axes[0].in_size + axes[0].out_size - 1) / axes[0].out_size;
    const int64_t window_w = (axes[1].in_size + axes[1].out_size - 1) / axes[1].out_size;
    pool2d_forward<AdaptiveAxis, false>(input, output, at::Tensor(), channels_last, {axes[0], axes[1], false, 0},
                                        window_h, window_w);
  }
  return output;
}

at::Tensor adaptive_avg_pool2d_backward_cuda(const at::Tensor& grad_output, at::IntArrayRef input_size,
                                             bool channels_last) {
  constexpr const char* op = "adaptive_avg_pool2d_backward_cuda";
  check_values(grad_output, op, "grad_output");
  const auto in = int_pair(input_size, op, "input_size", 0);
  const auto axes = adaptive_axes({in[0], in[1]}, spatial(grad_output));
  const c10::cuda::CUDAGuard guard(grad_output.device());
  auto grad_input = empty_grad_input(grad_output, in, channels_last);
  if (grad_output.numel() == 0) return grad_input.zero_();  // no window reaches the input
  if (grad_input.numel() > 0) {
    pool2d_backward<AdaptiveAxis, false>(grad_output, at::Tensor(), grad_input, channels_last,
                                         {axes[0], axes[1], false, 0});
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(vkernels, VKERNELS_DISPATCH_KEY, m) {
  m.impl("max_pool2d_cuda", &max_pool2d_cuda);
  m.impl("max_pool2d_backward_cuda", &max_pool2d_backward_cuda);
  m.impl("avg_pool2d_cuda", &avg_pool2d_cuda);
  m.impl("avg_pool2d_backward_cuda", &avg_pool2d_backward_cuda);
  m.impl("adaptive_avg_pool2d_cuda", &adaptive_avg_pool2d_cuda);
  m.impl("adaptive_avg_pool2d_backward_cuda", &adaptive_avg_pool2d_backward_cuda);
}

}  // namespace vkernels
