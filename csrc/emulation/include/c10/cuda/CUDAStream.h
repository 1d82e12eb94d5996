// Emulation shim for <c10/cuda/CUDAStream.h>: everything the kernels use of it is in cuda_emulation.h.
#pragma once
#include <cuda_emulation.h>
