// Device helpers shared by the CUDA kernels: conversions, aligned vectors, the row-status
// word, and the host-side plumbing (device guard, pinned-pointer mapping, error status).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../../common/codes.h"
#include "kernels.h"

namespace fastft {
namespace cuda {

// ---- conversions: float32 <-> storage types, round to nearest even (as PyTorch casts) ----

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(int8_t x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- aligned vectors: V consecutive elements moved with one (or a few) wide accesses ----

// Alignment of a V-element group: its size, capped at 16 bytes (the widest load). The same
// trick as PyTorch's aligned_vector: an aligned struct copy compiles to ld/st.v2/v4.
template <typename T, int V>
constexpr int vec_align() {
  return sizeof(T) * V >= 16 ? 16 : static_cast<int>(sizeof(T) * V);
}

template <typename T, int V>
struct alignas(vec_align<T, V>()) Vec {
  T v[V];
};

// ---- row status (see kernels.h): first bad row wins, out-of-range before duplicates ----

__device__ __forceinline__ void report_row(unsigned long long* status, int kind, int64_t index) {
  atomicMin(status, (static_cast<unsigned long long>(kind) << kRowKindShift) |
                        static_cast<unsigned long long>(index));
}

// ---- host side ----

// Makes `device` current for the lifetime of the guard (PyTorch's own cudart and ours share
// the driver's per-thread current context, so this also agrees with torch's device guard).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&prev_);
    if (err_ == cudaSuccess && prev_ != device) {
      err_ = cudaSetDevice(device);
      restore_ = err_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  bool restore_ = false;
  cudaError_t err_;
};

inline LaunchStatus ok() { return {kLaunchOk, std::string()}; }

inline LaunchStatus cuda_error(const char* what, cudaError_t err) {
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  return {kLaunchCudaError, std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                                cudaGetErrorString(err) + ")"};
}

// The device-side address of pinned host memory (or of device memory, unchanged).
// cudaPointerGetAttributes resolves pointers into the middle of an allocation (a tensor
// view of a pinned buffer); cudaHostGetDevicePointer is the fallback.
inline LaunchStatus device_pointer(const void* p, bool on_host, const char* name, void** out) {
  *out = const_cast<void*>(p);
  if (!on_host || p == nullptr) return ok();
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) return cuda_error(name, err);
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) return ok();
  if (attr.type == cudaMemoryTypeHost) {
    if (attr.devicePointer != nullptr) {
      *out = attr.devicePointer;
      return ok();
    }
    err = cudaHostGetDevicePointer(out, const_cast<void*>(p), 0);
    if (err == cudaSuccess) return ok();
    return cuda_error(name, err);
  }
  return {kLaunchBadArgument, std::string(name) +
                                  " is host memory that is not pinned; a CUDA kernel can only "
                                  "reach pinned memory (tensor.pin_memory())"};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads along D for a row of `groups` vector groups: a multiple of a warp, at most 256.
inline int threads_for(int64_t groups) {
  int64_t t = ceil_div(groups, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 256 ? 256 : t));
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Blocks in a grid-stride launch: enough to fill any device, within gridDim.x limits.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

}  // namespace cuda
}  // namespace fastft
