// CUDA kernels of the fastft ops: the host-side API, callable from plain C++ (bindings.cpp
// includes no CUDA header). Torch-free: raw pointers, sizes, strides (in elements), dtype
// codes, the device index and the stream come from Python (fastft/ops/cuda.py), which has
// validated shapes, dtypes and devices.
//
// Row checks run on the device, without a host synchronisation: the kernels record the
// first bad row in `scratch[0]` (see row_status below) and never read or write through a
// bad row; cache_write checks every row (range, duplicates) before it writes anything, so a
// bad call leaves dst untouched. Python reads the status back (at once, or lazily).
#pragma once
#include <cstdint>
#include <string>

#include "../../common/codes.h"

namespace fastft {
namespace cuda {

// What a launch returned. Row errors are not reported here but in scratch[0]. Exported to
// Python by codes() in bindings.cpp.
enum LaunchCode : int {
  kLaunchOk = kOk,
  kLaunchBadArgument = kBadArgument,  // e.g. a host pointer that is not pinned
  kLaunchCudaError = 100,  // a CUDA runtime error; `message` holds cudaGetErrorString
};

struct LaunchStatus {
  int code;
  std::string message;
};

// scratch[0] after a call: kRowsOk, or (kind << 62) | index of the first bad row found,
// with kind 0 = out of range, 1 = repeated in one write. Out-of-range rows sort first, as
// on the CPU. Read as int64, kRowsOk is -1.
constexpr unsigned long long kRowsOk = ~0ull;
constexpr int kRowKindShift = 62;
constexpr int kRowKindOutOfRange = 0;
constexpr int kRowKindDuplicate = 1;

// int64 elements of device scratch that cache_write needs for a batch of B rows: the
// status word plus an open-addressing hash set of rows and, per slot, the first index
// holding that row (duplicates detection).
int64_t write_scratch_len(int64_t B);

// Pool src[B, L, D] (strided, on the device) over L, cast or int8-quantize, and scatter
// into dst[rows[b]] (row-major [N, D]) and scales[rows[b]]. `dst_on_host`: dst and scales
// are pinned host memory, written through their mapped device pointers.
LaunchStatus cache_write(const void* src, int src_dtype, int64_t B, int64_t L, int64_t D,
                         int64_t stride_b, int64_t stride_l, int64_t stride_d,
                         const int64_t* rows, void* dst, int dst_dtype, int64_t N, float* scales,
                         bool dst_on_host, int pool, const void* mask, int mask_dtype,
                         int64_t mask_stride_b, int64_t mask_stride_l, int64_t* scratch,
                         int64_t scratch_len, int device, uintptr_t stream);

// out[b] = dequantize(src[rows[b]]) for a row-major src[N, D]; out is row-major [B, D] on
// the device. `src_on_host`: src and scales are pinned host memory. scratch: 1 element.
LaunchStatus cache_gather(const void* src, int src_dtype, int64_t N, int64_t D,
                          const float* scales, bool src_on_host, const int64_t* rows, int64_t B,
                          void* out, int out_dtype, int64_t* scratch, int device,
                          uintptr_t stream);

// The CUDA runtime linked into this module versus the installed driver, without creating
// a context. error is empty when the runtime is usable.
struct RuntimeInfo {
  int runtime_version;
  int driver_version;
  int device_count;
  std::string error;
};
RuntimeInfo runtime_info();

}  // namespace cuda
}  // namespace fastft
