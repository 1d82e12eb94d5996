// The vkernels._C_emu extension module: every csrc/cuda/*.cu compiled for the CPU emulator
// (csrc/emulation/cuda_emulation.h). Loading it runs their TORCH_LIBRARY_IMPL(vkernels, CPU, ...)
// registrations, so the *_cuda ops take CPU tensors; vkernels.dispatch loads it under
// VKERNELS_CUDA_EMULATE=1.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>

namespace vkernels::emulation {  // csrc/emulation/runtime.cpp
void set_schedule(const std::string& name, uint64_t seed);
std::pair<std::string, uint64_t> schedule();
}  // namespace vkernels::emulation

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vkernels' CUDA C++ kernels emulated on the CPU, registered as torch.ops.vkernels.*_cuda for CPU tensors.";
#if defined(__SANITIZE_ADDRESS__)
  m.attr("sanitized") = true;  // built with VKERNELS_SANITIZE=1: -fsanitize=address,undefined
#else
  m.attr("sanitized") = false;
#endif
  m.def("set_schedule", &vkernels::emulation::set_schedule, pybind11::arg("name"), pybind11::arg("seed") = 0,
        "Order of the threads between synchronisations: 'fifo' (thread order) or 'random' (seeded per launch).");
  m.def("schedule", &vkernels::emulation::schedule, "The current schedule and seed: ('fifo' or 'random', seed).");
}
