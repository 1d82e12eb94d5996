// Emulation shim for <c10/cuda/CUDAGuard.h>: everything the kernels use of it is in cuda_emulation.h.
#pragma once
#include <cuda_emulation.h>
