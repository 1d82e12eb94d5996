// The max-pool argmax dtype rule shared by pooling.cu and conv.cu's fused pool.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace vkernels {

// The smallest integer dtype that holds every position of a window of `window_elements`, as
// vkernels.shapes.window_index_dtype.
inline at::ScalarType window_index_dtype(int64_t window_elements) {
  if (window_elements <= 128) return at::kChar;
  if (window_elements <= 32768) return at::kShort;
  return at::kInt;
}

}  // namespace vkernels
