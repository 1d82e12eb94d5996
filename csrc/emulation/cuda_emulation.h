// CUDA as the kernels in csrc/cuda see it, emulated on the CPU for vkernels._C_emu.
//
// The emulation build compiles every csrc/cuda/*.cu as C++ with the host compiler: setup.py writes
// one translation unit per kernel file that includes this header, then the .cu; the shim headers in
// csrc/emulation/include (cuda_fp16.h, c10/cuda/CUDAGuard.h, ...) come first on the include path
// and forward here. What it provides, with CUDA's semantics:
//   - execution-space qualifiers, __launch_bounds__ (accepted, not checked), dim3, threadIdx,
//     blockIdx, blockDim, gridDim, warpSize, min/max;
//   - __syncthreads, __syncwarp, __shfl*_sync, __ballot_sync/__any_sync/__all_sync: the threads of a
//     block are fibers on one host thread, switched only where CUDA synchronises, so a barrier waits
//     for every thread of the block and a warp collective for every lane of its mask. A barrier or
//     collective that cannot complete (a thread exited, waits elsewhere, lanes disagree on the mask)
//     stops the launch with an error naming the kernel, block and thread;
//   - shared memory (VKERNELS_SHARED, VKERNELS_DYNAMIC_SHARED from runtime.cuh): one exact-size heap
//     allocation per array per block, filled with 0xff bytes (NaN in every float type), so overruns
//     are AddressSanitizer errors and reads of never-written shared memory show up as NaN. Shared
//     addresses (__cvta_generic_to_shared) are (array, offset) pairs checked on every use;
//   - __half / __nv_bfloat16 with round-to-nearest-even conversions;
//   - the tensor-core and async-copy primitives mma.cuh wraps (cp.async, ldmatrix, mma.sync; see
//     the functions below), each lane holding the fragment elements the PTX ISA assigns it;
//   - launch_kernel (the <<<grid, block, shared bytes, stream>>> of runtime.cuh), the runtime and
//     device queries the host code makes (answered as an H100/H200 would), cudaFuncSetAttribute.
// Nothing here models timing, occupancy, memory ordering between warps or caches: see README.
#pragma once

#define VKERNELS_EMULATION 1

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Qualifiers and built-in variables
// ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Shared memory is per block, which a declaration in a fiber's frame cannot be: runtime.cuh's forms
// say which array a block needs.
#define __shared__ static_assert(false, "declare shared memory with VKERNELS_SHARED / VKERNELS_DYNAMIC_SHARED (runtime.cuh)");

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// The running fiber's indices; the scheduler sets them before switching to a thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// CUDA's device math in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;

// CUDA's device overloads of min and max.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// The emulator's entry points (csrc/emulation/runtime.cpp)
// ---------------------------------------------------------------------------------------------

namespace vkernels::emulation {

// Where a barrier or collective was called: named in error messages, and two __syncthreads are the
// same barrier only at the same site. VKERNELS_EMULATION_CALLER declares parameters whose defaults
// are the caller's file and line.
struct Site {
  const char* file;
  int line;
};
#define VKERNELS_EMULATION_CALLER const char *file = __builtin_FILE(), int line = __builtin_LINE()

enum class Collective : uint8_t {
  kSyncwarp,
  kShuffleIndex,
  kShuffleUp,
  kShuffleDown,
  kShuffleXor,
  kBallot,
  kLdmatrix,
  kLdmatrixTrans,
  kMmaF16,
  kMmaBf16,
};

// One lane's operands of a warp collective, replaced by its results (layouts in runtime.cpp).
struct LaneData {
  uint32_t word[12];
};

void sync_threads(Site site);
// Waits until every lane of `mask` has arrived at the same collective with the same mask; the last
// lane to arrive computes the results of all.
void warp_collective(Collective op, unsigned mask, LaneData& data, Site site);

// Shared memory of the running block: a static array (one allocation per declaration, found by
// `key`) and the dynamic array of the launch.
void* static_shared(const void* key, size_t bytes, size_t alignment, const char* name);
unsigned char* dynamic_shared();
// A shared-memory address (__cvta_generic_to_shared) of a pointer into the block's shared memory,
// and back to a pointer to `bytes` bytes aligned to `alignment` (checked: an error otherwise).
uint32_t shared_address(const void* pointer);
void* shared_pointer(uint32_t address, size_t bytes, size_t alignment, const char* what);

// cp.async: the source is read at issue (src_bytes of `bytes`, the rest zero-filled); the write to
// shared memory lands when a cp.async.wait_group covering it runs (or when the thread exits), so a
// read before the wait sees the old contents, as it may on a GPU.
void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait_all();

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: a warp collective over all 32 lanes.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool trans,
                        VKERNELS_EMULATION_CALLER) {
  LaneData data{};
  data.word[0] = address;
  warp_collective(trans ? Collective::kLdmatrixTrans : Collective::kLdmatrix, 0xffffffffu, data, {file, line});
  for (int i = 0; i < 4; ++i) r[i] = data.word[i];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: c += a * b over the warp's fragments.
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool f16,
                      VKERNELS_EMULATION_CALLER) {
  LaneData data{};
  for (int i = 0; i < 4; ++i) data.word[i] = a[i];
  data.word[4] = b0;
  data.word[5] = b1;
  for (int i = 0; i < 4; ++i) std::memcpy(&data.word[6 + i], &c[i], 4);
  warp_collective(f16 ? Collective::kMmaF16 : Collective::kMmaBf16, 0xffffffffu, data, {file, line});
  for (int i = 0; i < 4; ++i) std::memcpy(&c[i], &data.word[i], 4);
}

// ex2.approx.ftz.f32: exp2 with subnormal inputs and results flushed to zero.
inline float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

template <typename S>
S& static_shared_array(const char* name) {
  static const char key = 0;  // one per declaration (and template instantiation)
  return *static_cast<S*>(static_shared(&key, sizeof(S), alignof(S), name));
}

// A launch: `body` runs once per thread of every block. Used through launch_kernel.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*body)(const void*),
              const void* closure);
void set_max_dynamic_shared(const void* kernel, int bytes);
// The order threads run in between synchronisations: "fifo" (thread order, the default) or
// "random" (drawn per switch, seeded per launch from `seed`); VKERNELS_EMULATION_SCHEDULE and
// VKERNELS_EMULATION_SEED set it at load.
void set_schedule(const std::string& name, uint64_t seed);
std::pair<std::string, uint64_t> schedule();

// Device properties the host code queries, those of an H100 / H200 (sm_90, 132 SMs).
constexpr int kComputeCapabilityMajor = 9;
constexpr int kMultiprocessors = 132;
constexpr int kSharedPerBlockDefault = 48 * 1024;
constexpr int kSharedPerBlockOptin = 232448;

// Round-to-nearest-even conversions, as cvt.rn on the device; NaN becomes the canonical NaN 0x7fff.
inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
inline uint16_t float_to_half_bits(float x) {
  const uint32_t bits = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0x7fffu;                       // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;               // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {                                      // below 2^-14: subnormal or zero
    // x * 2^24 is exact and below 2^10; rint rounds it to nearest even (the default rounding mode)
    return sign | static_cast<uint16_t>(std::rint(std::fabs(x) * 16777216.0f));
  }
  // rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even
  return sign | static_cast<uint16_t>((magnitude - 0x38000000u + 0xfffu + ((magnitude >> 13) & 1u)) >> 13);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
inline uint16_t float_to_bfloat16_bits(float x) {
  const uint32_t bits = float_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline float bfloat16_bits_to_float(uint16_t bits) { return bits_float(uint32_t{bits} << 16); }

template <typename T>
uint32_t to_word(T value) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>);
  uint32_t word;
  std::memcpy(&word, &value, 4);
  return word;
}
template <typename T>
T from_word(uint32_t word) {
  T value;
  std::memcpy(&value, &word, 4);
  return value;
}

// __shfl*_sync of a 4- or 8-byte value (8 bytes move as two words, as CUDA does).
template <typename T>
T shuffle(Collective op, unsigned mask, T value, int lane_arg, int width, Site site) {
  static_assert((sizeof(T) == 4 || sizeof(T) == 8) && std::is_trivially_copyable_v<T>,
                "the emulated shuffles move 4- or 8-byte values");
  uint32_t words[sizeof(T) / 4];
  std::memcpy(words, &value, sizeof(T));
  for (uint32_t& word : words) {
    LaneData data{};
    data.word[0] = word;
    data.word[1] = static_cast<uint32_t>(lane_arg);
    data.word[2] = static_cast<uint32_t>(width);
    warp_collective(op, mask, data, site);
    word = data.word[0];
  }
  T result;
  std::memcpy(&result, words, sizeof(T));
  return result;
}

}  // namespace vkernels::emulation

// ---------------------------------------------------------------------------------------------
// Device functions
// ---------------------------------------------------------------------------------------------

inline void __syncthreads(VKERNELS_EMULATION_CALLER) {
  vkernels::emulation::sync_threads({file, line});
}

inline void __syncwarp(unsigned mask = 0xffffffffu, VKERNELS_EMULATION_CALLER) {
  vkernels::emulation::LaneData data{};
  vkernels::emulation::warp_collective(vkernels::emulation::Collective::kSyncwarp, mask, data, {file, line});
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              VKERNELS_EMULATION_CALLER) {
  return vkernels::emulation::shuffle(vkernels::emulation::Collective::kShuffleIndex, mask, var, src_lane, width,
                                      {file, line});
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 VKERNELS_EMULATION_CALLER) {
  return vkernels::emulation::shuffle(vkernels::emulation::Collective::kShuffleUp, mask, var,
                                      static_cast<int>(delta), width, {file, line});
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   VKERNELS_EMULATION_CALLER) {
  return vkernels::emulation::shuffle(vkernels::emulation::Collective::kShuffleDown, mask, var,
                                      static_cast<int>(delta), width, {file, line});
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  VKERNELS_EMULATION_CALLER) {
  return vkernels::emulation::shuffle(vkernels::emulation::Collective::kShuffleXor, mask, var, lane_mask, width,
                                      {file, line});
}

inline unsigned __ballot_sync(unsigned mask, int predicate, VKERNELS_EMULATION_CALLER) {
  vkernels::emulation::LaneData data{};
  data.word[0] = predicate != 0;
  vkernels::emulation::warp_collective(vkernels::emulation::Collective::kBallot, mask, data, {file, line});
  return data.word[0];
}
inline int __any_sync(unsigned mask, int predicate, VKERNELS_EMULATION_CALLER) {
  return __ballot_sync(mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, VKERNELS_EMULATION_CALLER) {
  return __ballot_sync(mask, predicate, file, line) == mask;
}

inline size_t __cvta_generic_to_shared(const void* pointer) {
  return vkernels::emulation::shared_address(pointer);
}

template <typename T>
inline T __ldg(const T* pointer) {
  return *pointer;
}

// ---------------------------------------------------------------------------------------------
// cuda_fp16.h and cuda_bf16.h, as torch builds them: no implicit conversions, no operators
// (__CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_HALF_OPERATORS__, ...), so code that compiles here
// compiles with nvcc too.
// ---------------------------------------------------------------------------------------------

struct __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) { return vkernels::emulation::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float x) { return {vkernels::emulation::float_to_half_bits(x)}; }
inline __half __float2half(float x) { return __float2half_rn(x); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float x) { return {__float2half_rn(x), __float2half_rn(x)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

inline float __bfloat162float(__nv_bfloat16 h) { return vkernels::emulation::bfloat16_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {vkernels::emulation::float_to_bfloat16_bits(x)}; }
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// Fast-math intrinsics: the exact function (the device's are within a few ulp of it).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// ---------------------------------------------------------------------------------------------
// The runtime API (cuda_runtime_api.h) and c10/cuda, as far as the host code uses them
// ---------------------------------------------------------------------------------------------

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument (CUDA emulation)";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  namespace e = vkernels::emulation;
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = e::kSharedPerBlockDefault; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = e::kMultiprocessors; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = e::kComputeCapabilityMajor; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = e::kSharedPerBlockOptin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > vkernels::emulation::kSharedPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  vkernels::emulation::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

// Device guards have nothing to switch: the emulated kernels run on the calling host thread.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace c10::cuda

// Launch errors are exceptions thrown by launch_kernel; other runtime calls are checked here.
#define C10_CUDA_CHECK(expr)                                                                                    \
  do {                                                                                                          \
    const cudaError_t vkernels_emulation_error = (expr);                                                         \
    TORCH_CHECK(vkernels_emulation_error == cudaSuccess, "CUDA emulation: ", #expr, " failed: ",                \
                cudaGetErrorString(vkernels_emulation_error));                                                  \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

// ---------------------------------------------------------------------------------------------
// runtime.cuh's interface, emulated
// ---------------------------------------------------------------------------------------------

#define VKERNELS_DISPATCH_KEY CPU

// A per-block array: one allocation per declaration and block, reached through a reference.
#define VKERNELS_SHARED(specifiers, name, dims)     \
  struct vkernels_shared_##name {                   \
    specifiers value dims;                          \
  };                                                \
  auto& name = ::vkernels::emulation::static_shared_array<vkernels_shared_##name>(#name).value
#define VKERNELS_DYNAMIC_SHARED(name) unsigned char* const name = ::vkernels::emulation::dynamic_shared()

namespace vkernels {

// kernel<<<grid, block, shared_bytes, stream>>>(args...): each thread gets its own copy of the
// arguments converted to the kernel's parameter types.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t /*stream*/,
                   const Args&... args) {
  const std::tuple<std::decay_t<Params>...> params(args...);
  auto body = [kernel, &params] { std::apply(kernel, params); };
  emulation::run_grid(
      reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
      [](const void* closure) { (*static_cast<const decltype(body)*>(closure))(); }, &body);
}

}  // namespace vkernels
