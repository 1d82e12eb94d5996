// What a kernel file needs from its build, in the one form both builds compile:
//   TORCH_LIBRARY_IMPL(vkernels, VKERNELS_DISPATCH_KEY, m)   the ops' dispatch key (CUDA; CPU emulated)
//   launch_kernel(kernel, grid, block, shared_bytes, stream, args...)   for kernel<<<...>>>(args...)
//   VKERNELS_SHARED(alignas(16) float, tile, [64][68]);      for __shared__ alignas(16) float tile[64][68];
//   VKERNELS_DYNAMIC_SHARED(shared);                          for extern __shared__ __align__(128) unsigned char shared[];
//   on_kernel_device(tensor)                                  the tensors the kernels take (CUDA; CPU emulated)
// The GPU build (nvcc) gets the definitions below, which expand to exactly the CUDA they stand for;
// the emulation build (vkernels._C_emu) gets csrc/emulation/cuda_emulation.h's, included before the
// kernel file. Besides mma.cuh's primitive wrappers this is the only file that knows which build it
// is in: kernel files hold no #if of their own.
#pragma once

#include <c10/core/Device.h>

#ifndef VKERNELS_EMULATION
#include <cuda_runtime_api.h>

#define VKERNELS_DISPATCH_KEY CUDA
#define VKERNELS_SHARED(specifiers, name, dims) __shared__ specifiers name dims
#define VKERNELS_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]

namespace vkernels {

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   const Args&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
}

}  // namespace vkernels
#endif

namespace vkernels {

// The device type whose tensors this build's kernels read and write.
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::VKERNELS_DISPATCH_KEY;

template <typename TensorLike>
bool on_kernel_device(const TensorLike& t) {
  return t.device().type() == kKernelDevice;
}

}  // namespace vkernels
