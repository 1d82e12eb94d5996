// Test-only kernels of the emulator (tests/test_cuda_emulation.py), as ops vkernels_emulation::*
// on CPU tensors. They check the emulated primitives against the PTX ISA's definitions, which the
// tests encode on their own (independently of mma.cuh and of runtime.cpp), the barrier and shuffle
// semantics, the errors a broken kernel gets, and, in the sanitized build, a shared-memory overrun.
#include "cuda_emulation.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../cuda/mma.cuh"
#include "../cuda/runtime.cuh"

namespace vkernels {
namespace {

// ---------------------------------------------------------------------------------------------
// Fragments: one warp's registers in, its registers out
// ---------------------------------------------------------------------------------------------

// Lane L holds a_regs[L][0..3], b_regs[L][0..1] and c[L][0..3]; d[L] = its accumulators after one mma.
template <typename T>
__global__ void warp_mma_kernel(const int32_t* a_regs, const int32_t* b_regs, const float* c, float* d) {
  const int lane = threadIdx.x;
  uint32_t a[4];
  float acc[4];
  for (int i = 0; i < 4; ++i) {
    a[i] = static_cast<uint32_t>(a_regs[lane * 4 + i]);
    acc[i] = c[lane * 4 + i];
  }
  mma_16816<T>(acc, a, static_cast<uint32_t>(b_regs[lane * 2]), static_cast<uint32_t>(b_regs[lane * 2 + 1]));
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

at::Tensor warp_mma(const at::Tensor& a_regs, const at::Tensor& b_regs, const at::Tensor& c, bool bf16) {
  auto d = at::empty({32, 4}, c.options());
  auto run = [&](auto kernel) {
    launch_kernel(kernel, 1, 32, 0, nullptr, a_regs.const_data_ptr<int32_t>(), b_regs.const_data_ptr<int32_t>(),
                  c.const_data_ptr<float>(), d.mutable_data_ptr<float>());
  };
  bf16 ? run(warp_mma_kernel<__nv_bfloat16>) : run(warp_mma_kernel<__half>);
  return d;
}

// The bytes of `image` in dynamic shared memory; lane L loads ldmatrix .x4 at byte offsets[L].
__global__ void warp_ldmatrix_kernel(const uint8_t* image, int bytes, const int32_t* offsets, bool trans, int32_t* out) {
  VKERNELS_DYNAMIC_SHARED(shared);
  const int lane = threadIdx.x;
  for (int i = lane; i < bytes; i += 32) shared[i] = image[i];
  __syncwarp();
  uint32_t r[4];
  const uint32_t address = smem_u32(shared) + static_cast<uint32_t>(offsets[lane]);
  if (trans) {
    ldmatrix_x4_trans(r, address);
  } else {
    ldmatrix_x4(r, address);
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = static_cast<int32_t>(r[i]);
}

at::Tensor warp_ldmatrix(const at::Tensor& image, const at::Tensor& offsets, bool trans) {
  auto out = at::empty({32, 4}, offsets.options());
  launch_kernel(warp_ldmatrix_kernel, 1, 32, image.numel(), nullptr, image.const_data_ptr<uint8_t>(),
                static_cast<int>(image.numel()), offsets.const_data_ptr<int32_t>(), trans, out.mutable_data_ptr<int32_t>());
  return out;
}

// D (16 x 16, fp32) = A (16 x 16) B (16 x 16) the way the kernels compute it: A and B staged in
// padded shared tiles, A stored [m][k] or [k][m], B stored [n][k] or [k][n], fragments loaded with
// mma.cuh's lane offsets, two m16n8k16 tiles along n.
template <typename T, bool kATransposed, bool kBTransposed>
__global__ void tile_product_kernel(const T* a, const T* b, float* d) {
  constexpr int kLd = 16 + 8;
  VKERNELS_SHARED(alignas(16) T, a_tile, [16 * kLd]);
  VKERNELS_SHARED(alignas(16) T, b_tile, [16 * kLd]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    a_tile[i / 16 * kLd + i % 16] = a[i];
    b_tile[i / 16 * kLd + i % 16] = b[i];
  }
  __syncwarp();
  uint32_t af[4], bf[4];
  if constexpr (kATransposed) {
    ldmatrix_x4_trans(af, smem_u32(a_tile) + b_lane_offset<kLd>(lane));
  } else {
    ldmatrix_x4(af, smem_u32(a_tile) + a_lane_offset<kLd>(lane));
  }
  if constexpr (kBTransposed) {
    ldmatrix_x4_trans(bf, smem_u32(b_tile) + a_lane_offset<kLd>(lane));
  } else {
    ldmatrix_x4(bf, smem_u32(b_tile) + b_lane_offset<kLd>(lane));
  }
  float acc[2][4] = {};
  mma_16816<T>(acc[0], af, bf[0], bf[1]);
  mma_16816<T>(acc[1], af, bf[2], bf[3]);
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 2; ++j) {
    for (int e = 0; e < 4; ++e) d[(g + 8 * (e / 2)) * 16 + 8 * j + 2 * t + e % 2] = acc[j][e];
  }
}

// a: A as [m][k] (or [k][m] when a_transposed); b: B as [n][k] (or [k][n] when b_transposed).
at::Tensor tile_product(const at::Tensor& a, const at::Tensor& b, bool a_transposed, bool b_transposed) {
  auto d = at::empty({16, 16}, a.options().dtype(at::kFloat));
  dispatch_dtype(a.scalar_type(), "tile_product", [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>) {
      auto run = [&](auto kernel) {
        launch_kernel(kernel, 1, 32, 0, nullptr, static_cast<const T*>(a.const_data_ptr()),
                      static_cast<const T*>(b.const_data_ptr()), d.mutable_data_ptr<float>());
      };
      if (a_transposed) {
        b_transposed ? run(tile_product_kernel<T, true, true>) : run(tile_product_kernel<T, true, false>);
      } else {
        b_transposed ? run(tile_product_kernel<T, false, true>) : run(tile_product_kernel<T, false, false>);
      }
    }
  });
  return d;
}

// ---------------------------------------------------------------------------------------------
// Shuffles, barriers, cp.async, conversions
// ---------------------------------------------------------------------------------------------

// Thread i (of a block of values.numel() threads) in `mask` of its warp calls the shuffle with its
// value and argument; the others keep their value.
__global__ void shuffle_kernel(const int32_t* values, const int32_t* args, int op, int width, unsigned mask,
                               int32_t* out) {
  const int i = threadIdx.x;
  int32_t v = values[i];
  if (mask >> (i % 32) & 1u) {
    switch (op) {
      case 0: v = __shfl_sync(mask, v, args[i], width); break;
      case 1: v = __shfl_up_sync(mask, v, static_cast<unsigned>(args[i]), width); break;
      case 2: v = __shfl_down_sync(mask, v, static_cast<unsigned>(args[i]), width); break;
      default: v = __shfl_xor_sync(mask, v, args[i], width); break;
    }
  }
  out[i] = v;
}

at::Tensor shuffle(const at::Tensor& values, const at::Tensor& args, std::string op, int64_t width, int64_t mask) {
  const int code = op == "idx" ? 0 : op == "up" ? 1 : op == "down" ? 2 : 3;
  auto out = at::empty_like(values);
  launch_kernel(shuffle_kernel, 1, static_cast<unsigned>(values.numel()), 0, nullptr, values.const_data_ptr<int32_t>(),
                args.const_data_ptr<int32_t>(), code, static_cast<int>(width), static_cast<unsigned>(mask),
                out.mutable_data_ptr<int32_t>());
  return out;
}

// `rounds` times: every thread publishes its value, then takes its right neighbour's. Without a
// real barrier a thread would read a slot its neighbour has not written yet (0xff.. in the emulator).
__global__ void barrier_rotate_kernel(int rounds, int32_t* out) {
  VKERNELS_SHARED(int32_t, slots, [1024]);
  const int n = blockDim.x, i = threadIdx.x;
  int32_t v = i + 1000 * blockIdx.x;
  for (int r = 0; r < rounds; ++r) {
    slots[i] = v;
    __syncthreads();
    v = slots[(i + 1) % n];
    __syncthreads();
  }
  out[blockIdx.x * n + i] = v;
}

at::Tensor barrier_rotate(int64_t blocks, int64_t threads, int64_t rounds) {
  auto out = at::empty({blocks, threads}, at::kInt);
  launch_kernel(barrier_rotate_kernel, static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, nullptr,
                static_cast<int>(rounds), out.mutable_data_ptr<int32_t>());
  return out;
}

// Per thread: [before the wait, after the wait] of a 16-byte cp.async from src (zero-filled when
// src_bytes is 0), and the same for a 4-byte one.
__global__ void cp_async_kernel(const int32_t* src, bool valid, int32_t* out) {
  VKERNELS_SHARED(alignas(16) int32_t, tile, [32][8]);  // rows of 32 bytes: both copies aligned
  const int i = threadIdx.x;
  cp_async_16(smem_u32(&tile[i][0]), src + 4 * i, valid);
  cp_async_4(smem_u32(&tile[i][4]), src + 128 + i, valid);
  for (int e = 0; e < 5; ++e) out[i * 10 + e] = tile[i][e];
  cp_async_commit();
  cp_async_wait_all();
  for (int e = 0; e < 5; ++e) out[i * 10 + 5 + e] = tile[i][e];
}

at::Tensor cp_async(const at::Tensor& src, bool valid) {
  auto out = at::empty({32, 2, 5}, at::kInt);
  launch_kernel(cp_async_kernel, 1, 32, 0, nullptr, src.const_data_ptr<int32_t>(), valid, out.mutable_data_ptr<int32_t>());
  return out;
}

// from_float<T> (round to nearest even) of every x, as bits, and to_float of those bits.
template <typename T>
__global__ void convert_kernel(const float* x, int64_t n, int16_t* bits, float* back) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const T h = from_float<T>(x[i]);
    std::memcpy(&bits[i], &h, 2);
    back[i] = to_float(h);
  }
}

std::tuple<at::Tensor, at::Tensor> convert(const at::Tensor& x, bool bf16) {
  auto bits = at::empty(x.sizes(), x.options().dtype(at::kShort));
  auto back = at::empty_like(x);
  auto run = [&](auto kernel) {
    launch_kernel(kernel, 64, 256, 0, nullptr, x.const_data_ptr<float>(), x.numel(), bits.mutable_data_ptr<int16_t>(),
                  back.mutable_data_ptr<float>());
  };
  bf16 ? run(convert_kernel<__nv_bfloat16>) : run(convert_kernel<__half>);
  return {bits, back};
}

__global__ void exp2_approx_kernel(const float* x, int64_t n, float* y) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = exp2_approx(x[i]);
}

at::Tensor exp2_approx_op(const at::Tensor& x) {
  auto y = at::empty_like(x);
  launch_kernel(exp2_approx_kernel, 1, 32, 0, nullptr, x.const_data_ptr<float>(), x.numel(), y.mutable_data_ptr<float>());
  return y;
}

// Warp 1 reads what warp 0 writes, with no __syncthreads between: a race. In thread order warp 0
// has written everything before warp 1 runs; drawn at random, some reads come first.
__global__ void missing_barrier_kernel(int32_t* out) {
  VKERNELS_SHARED(int32_t, slots, [32]);
  if (threadIdx.x < 32) slots[threadIdx.x] = static_cast<int32_t>(threadIdx.x);
  if (threadIdx.x >= 32) out[threadIdx.x - 32] = slots[threadIdx.x - 32];
}

at::Tensor missing_barrier() {
  auto out = at::empty({32}, at::kInt);
  launch_kernel(missing_barrier_kernel, 1, 64, 0, nullptr, out.mutable_data_ptr<int32_t>());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Broken kernels: each must stop with an error (or, for the overrun, an AddressSanitizer report)
// ---------------------------------------------------------------------------------------------

__global__ void exits_before_barrier_kernel() {
  if (threadIdx.x == 37) return;
  __syncthreads();
}
__global__ void different_barriers_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}
__global__ void mask_disagreement_kernel(int32_t* out) {
  const unsigned mask = threadIdx.x < 16 ? 0xffffffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<int32_t>(threadIdx.x), 1);
}
__global__ void exited_lane_kernel(int32_t* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int32_t>(threadIdx.x), 0);
}
__global__ void lane_waits_at_barrier_kernel(int32_t* out) {
  if (threadIdx.x == 5) {
    __syncthreads();
    return;
  }
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int32_t>(threadIdx.x), 0);
}
__global__ void ldmatrix_out_of_bounds_kernel(int32_t* out) {
  VKERNELS_SHARED(alignas(16) uint16_t, tile, [8 * 32]);
  uint32_t r[4];
  // rows of 16 bytes: the 32 row addresses of lanes 0..31 reach byte 32 * 16 + 16 = 528 > 512
  ldmatrix_x4(r, smem_u32(tile) + (threadIdx.x + 1) * 16);
  out[threadIdx.x] = static_cast<int32_t>(r[0]);
}
__global__ void cp_async_misaligned_kernel(const int32_t* src) {
  VKERNELS_SHARED(alignas(16) int32_t, tile, [4]);
  cp_async_16(smem_u32(tile), src + 1, true);
  cp_async_commit();
  cp_async_wait_all();
}
__global__ void large_dynamic_shared_kernel() {
  VKERNELS_DYNAMIC_SHARED(shared);
  shared[threadIdx.x] = 0;
}
// One element past a static shared array, through a pointer as the kernels index their tiles:
// AddressSanitizer's heap-buffer-overflow in the sanitized build (on a GPU it would silently write
// the next array).
__global__ void shared_overrun_kernel(int index) {
  VKERNELS_SHARED(float, tile, [32]);
  float* row = tile;
  row[threadIdx.x + index] = 1.0f;
}

void fault(std::string kind) {
  auto out = at::empty({64}, at::kInt);
  auto* o = out.mutable_data_ptr<int32_t>();
  if (kind == "exits_before_barrier") {
    launch_kernel(exits_before_barrier_kernel, 2, 64, 0, nullptr);
  } else if (kind == "different_barriers") {
    launch_kernel(different_barriers_kernel, 1, 64, 0, nullptr);
  } else if (kind == "mask_disagreement") {
    launch_kernel(mask_disagreement_kernel, 1, 32, 0, nullptr, o);
  } else if (kind == "exited_lane") {
    launch_kernel(exited_lane_kernel, 1, 32, 0, nullptr, o);
  } else if (kind == "lane_waits_at_barrier") {
    launch_kernel(lane_waits_at_barrier_kernel, 1, 32, 0, nullptr, o);
  } else if (kind == "ldmatrix_out_of_bounds") {
    launch_kernel(ldmatrix_out_of_bounds_kernel, 1, 32, 0, nullptr, o);
  } else if (kind == "cp_async_misaligned") {
    launch_kernel(cp_async_misaligned_kernel, 1, 1, 0, nullptr, out.const_data_ptr<int32_t>());
  } else if (kind == "large_dynamic_shared") {
    launch_kernel(large_dynamic_shared_kernel, 1, 32, 64 * 1024, nullptr);
  } else if (kind == "shared_overrun") {
    launch_kernel(shared_overrun_kernel, 1, 32, 0, nullptr, 1);
  } else {
    TORCH_CHECK(false, "unknown fault ", kind);
  }
}

}  // namespace

TORCH_LIBRARY(vkernels_emulation, m) {
  m.def("warp_mma(Tensor a_regs, Tensor b_regs, Tensor c, bool bf16) -> Tensor");
  m.def("warp_ldmatrix(Tensor image, Tensor offsets, bool trans) -> Tensor");
  m.def("tile_product(Tensor a, Tensor b, bool a_transposed, bool b_transposed) -> Tensor");
  m.def("shuffle(Tensor values, Tensor args, str op, int width, int mask) -> Tensor");
  m.def("barrier_rotate(int blocks, int threads, int rounds) -> Tensor");
  m.def("cp_async(Tensor src, bool valid) -> Tensor");
  m.def("convert(Tensor x, bool bf16) -> (Tensor, Tensor)");
  m.def("exp2_approx(Tensor x) -> Tensor");
  m.def("fault(str kind) -> ()");
  m.def("missing_barrier() -> Tensor");
}

TORCH_LIBRARY_IMPL(vkernels_emulation, CPU, m) {
  m.impl("warp_mma", &warp_mma);
  m.impl("warp_ldmatrix", &warp_ldmatrix);
  m.impl("tile_product", &tile_product);
  m.impl("shuffle", &shuffle);
  m.impl("cp_async", &cp_async);
  m.impl("convert", &convert);
  m.impl("exp2_approx", &exp2_approx_op);
}

// Ops without tensor arguments dispatch on the backend-independent key.
TORCH_LIBRARY_IMPL(vkernels_emulation, CompositeExplicitAutograd, m) {
  m.impl("barrier_rotate", &barrier_rotate);
  m.impl("fault", &fault);
  m.impl("missing_barrier", &missing_barrier);
}

}  // namespace vkernels
