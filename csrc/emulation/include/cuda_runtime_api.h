// Emulation shim for <cuda_runtime_api.h>: everything the kernels use of it is in cuda_emulation.h.
#pragma once
#include <cuda_emulation.h>
