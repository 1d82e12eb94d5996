// Emulation shim for <cuda_runtime.h>: everything the kernels use of it is in cuda_emulation.h.
#pragma once
#include <cuda_emulation.h>
