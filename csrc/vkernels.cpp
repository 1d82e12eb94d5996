// The vkernels._C extension module. Loading it runs the TORCH_LIBRARY_IMPL(vkernels, CUDA, ...)
// registrations of every csrc/cuda/*.cu; the op schemas are defined in Python (vkernels/ops/), and
// the dispatcher accepts the two in either order.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

// setup.py generates it: the hashes of the kernel sources this binary is built from (vkernels/sources.py)
#if __has_include("vkernels_sources.h")
#include "vkernels_sources.h"
#else
#define VKERNELS_SOURCE_HASHES "{}"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ kernels of vkernels, registered as torch.ops.vkernels.*_cuda on import.";
  // Toolkit the kernels were compiled with (e.g. 13000): lets backends report a torch/toolkit mismatch.
  m.attr("cuda_version") = CUDART_VERSION;
  // JSON {family: hash of csrc/cuda/<family>.cu and its headers}: verification records name the
  // sources they passed with, and a binary built from other sources is unverified.
  m.attr("source_hashes") = VKERNELS_SOURCE_HASHES;
}
