// The vkernels._C extension module. Loading it runs the TORCH_LIBRARY_IMPL(vkernels, CUDA, ...)
// registrations of every csrc/cuda/*.cu; the op schemas are defined in Python (vkernels/ops/), and
// the dispatcher accepts the two in either order.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ kernels of vkernels, registered as torch.ops.vkernels.*_cuda on import.";
  // Toolkit the kernels were compiled with (e.g. 13000): lets backends report a torch/toolkit mismatch.
  m.attr("cuda_version") = CUDART_VERSION;
}
