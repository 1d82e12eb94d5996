// Tensor-core and async-copy building blocks shared by the CUDA kernels (attention.cu, conv.cu):
// element conversions, cp.async, ldmatrix, mma.sync m16n8k16 with fp32 accumulators and ex2.approx.
// Each primitive is inline PTX on the GPU and a call into the emulator (csrc/emulation) in
// vkernels._C_emu: kernels use these wrappers, never asm of their own.
//
// Fragment layouts relied on (PTX ISA, mma.m16n8k16 .f16/.bf16; g = lane / 4, t = lane % 4):
//   A (16x16, row):  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 8+2t..)  a3 = (g+8, 8+2t..)
//   B (16x8, col):   b0 = (k = 2t..2t+1, n = g)            b1 = (k = 8+2t.., n = g)
//   C (16x8, f32):   c0,c1 = (g, 2t..2t+1)                 c2,c3 = (g+8, 2t..2t+1)
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane L receives, in register
//   i, row L/4, columns 2(L%4)..+1 of matrix i (.trans: column L/4, rows 2(L%4)..+1).
// Hence, with the lane offsets below:
//   A from an [m][k] tile: a_lane_offset, no .trans;   A from a [k][m] tile: b_lane_offset, .trans;
//   B from an [n][k] tile: b_lane_offset, no .trans;   B from a [k][n] tile: a_lane_offset, .trans;
// and one B ldmatrix .x4 gives {b0, b1} of n tiles j (registers 0, 1) and j+1 (registers 2, 3).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace vkernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#ifdef VKERNELS_EMULATION
  emulation::cp_async(dst, src, 16, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
#ifdef VKERNELS_EMULATION
  emulation::cp_async(dst, src, 4, valid ? 4 : 0);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef VKERNELS_EMULATION
  emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef VKERNELS_EMULATION
  emulation::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef VKERNELS_EMULATION
  emulation::ldmatrix_x4(r, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef VKERNELS_EMULATION
  emulation::ldmatrix_x4(r, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// c += a * b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef VKERNELS_EMULATION
  emulation::mma_16816(c, a, b0, b1, std::is_same_v<T, __half>);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// 2^x on the SFU (ex2.approx.ftz: about 2 ulp, subnormals flushed to zero); ex2.approx(-inf) = +0.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef VKERNELS_EMULATION
  return emulation::exp2_approx(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Lane byte offsets inside a [rows][ld] tile of 16-bit elements for ldmatrix .x4 (see the top).
template <int kLd>
__device__ __forceinline__ uint32_t a_lane_offset(int lane) {  // A from [m][k]; B from [k][n] with .trans
  return ((lane & 15) * kLd + (lane >> 4) * 8) * 2;
}
template <int kLd>
__device__ __forceinline__ uint32_t b_lane_offset(int lane) {  // B from [n][k]; A from [k][m] with .trans
  return (((lane & 7) + ((lane >> 4) << 3)) * kLd + ((lane >> 3) & 1) * 8) * 2;
}

// Calls fn with a value of the CUDA element type of `dtype` (float, __half or __nv_bfloat16).
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kHalf:
      fn(__half{});
      break;
    case at::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

}  // namespace vkernels
