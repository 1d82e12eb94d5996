// The vkernels._C_emu extension module: every csrc/cuda/*.cu compiled for the CPU emulator
// (csrc/emulation/cuda_emulation.h). Loading it runs their TORCH_LIBRARY_IMPL(vkernels, CPU, ...)
// registrations, so the *_cuda ops take CPU tensors; vkernels.dispatch loads it under
// VKERNELS_CUDA_EMULATE=1.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vkernels' CUDA C++ kernels emulated on the CPU, registered as torch.ops.vkernels.*_cuda for CPU tensors.";
#if defined(__SANITIZE_ADDRESS__)
  m.attr("sanitized") = true;  // built with VKERNELS_SANITIZE=1: -fsanitize=address,undefined
#else
  m.attr("sanitized") = false;
#endif
}
