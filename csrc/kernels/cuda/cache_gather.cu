// cache_gather on CUDA: out[b] = dequantize(src[rows[b]]), one pass.
//
// A block holds `blockDim.y` rows; its threads walk a row in groups of V elements. When
// rows start on 16-byte boundaries, V = 16 / sizeof(storage element), so every load is one
// 16-byte transaction (and the stores as wide as the output type allows); otherwise V = 1.
// src may be pinned host memory, read over the bus through its mapped address.
#include "device.cuh"

namespace fastft {
namespace cuda {
namespace {

template <typename TIn, typename TOut, int V>
__global__ void gather_kernel(const TIn* __restrict__ src, const float* __restrict__ scales,
                              const int64_t* __restrict__ rows, int64_t B, int64_t N,
                              int64_t D, TOut* __restrict__ out,
                              unsigned long long* __restrict__ status) {
  constexpr bool kQuantized = std::is_same<TIn, int8_t>::value;
  const int64_t groups = D / V;  // V divides D (checked on the host)
  for (int64_t b = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; b < B;
       b += int64_t(gridDim.x) * blockDim.y) {
    const int64_t r = rows[b];
    const bool bad = r < 0 || r >= N;
    if (bad && threadIdx.x == 0) report_row(status, kRowKindOutOfRange, b);
    // A bad row is never dereferenced; its output row is zeros (the call then raises).
    const float scale = bad ? 0.0f : (kQuantized ? scales[r] : 1.0f);
    const Vec<TIn, V>* in = reinterpret_cast<const Vec<TIn, V>*>(src + (bad ? 0 : r) * D);
    Vec<TOut, V>* o = reinterpret_cast<Vec<TOut, V>*>(out + b * D);
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      Vec<TOut, V> y;
      if (bad) {
#pragma unroll
        for (int i = 0; i < V; ++i) y.v[i] = from_f32<TOut>(0.0f);
      } else {
        const Vec<TIn, V> x = in[g];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          // The reference computes src.float() * scale, then casts: the same single rounding.
          const float f = kQuantized ? to_f32(x.v[i]) * scale : to_f32(x.v[i]);
          y.v[i] = from_f32<TOut>(f);
        }
      }
      o[g] = y;
    }
  }
}

template <typename TIn, typename TOut, int V>
cudaError_t launch(const void* src, const float* scales, const int64_t* rows, int64_t B,
                   int64_t N, int64_t D, void* out, unsigned long long* status,
                   cudaStream_t stream) {
  const int tx = threads_for(D / V);
  const int ty = 256 / tx;
  const int64_t blocks = std::min<int64_t>(ceil_div(B, ty), kMaxBlocks);
  gather_kernel<TIn, TOut, V><<<static_cast<unsigned>(blocks), dim3(tx, ty), 0, stream>>>(
      static_cast<const TIn*>(src), scales, rows, B, N, D, static_cast<TOut*>(out), status);
  return cudaGetLastError();
}

template <typename TIn, typename TOut>
cudaError_t launch_vec(bool vectorized, const void* src, const float* scales,
                       const int64_t* rows, int64_t B, int64_t N, int64_t D, void* out,
                       unsigned long long* status, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(TIn);
  if (vectorized) return launch<TIn, TOut, V>(src, scales, rows, B, N, D, out, status, stream);
  return launch<TIn, TOut, 1>(src, scales, rows, B, N, D, out, status, stream);
}

template <typename TIn>
cudaError_t launch_out(int out_dtype, bool vec, const void* src, const float* scales,
                       const int64_t* rows, int64_t B, int64_t N, int64_t D, void* out,
                       unsigned long long* status, cudaStream_t stream) {
  switch (out_dtype) {
    case kF32:
      return launch_vec<TIn, float>(vec, src, scales, rows, B, N, D, out, status, stream);
    case kF16:
      return launch_vec<TIn, __half>(vec, src, scales, rows, B, N, D, out, status, stream);
    case kBF16:
      return launch_vec<TIn, __nv_bfloat16>(vec, src, scales, rows, B, N, D, out, status,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

int64_t element_size(int dtype) { return dtype == kF32 ? 4 : dtype == kI8 ? 1 : 2; }

}  // namespace

LaunchStatus cache_gather(const void* src, int src_dtype, int64_t N, int64_t D,
                          const float* scales, bool src_on_host, const int64_t* rows, int64_t B,
                          void* out, int out_dtype, int64_t* scratch, int device,
                          uintptr_t stream_handle) {
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return cuda_error("cache_gather: set device", guard.error());
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  unsigned long long* status = reinterpret_cast<unsigned long long*>(scratch);
  cudaError_t err = cudaMemsetAsync(status, 0xFF, sizeof(*status), stream);  // = kRowsOk
  if (err != cudaSuccess) return cuda_error("cache_gather: clear status", err);
  if (B == 0 || D == 0) return ok();

  void* src_dev = nullptr;
  void* scales_dev = nullptr;
  LaunchStatus st = device_pointer(src, src_on_host, "cache_gather: src", &src_dev);
  if (st.code != kLaunchOk) return st;
  if (src_dtype == kI8) {
    st = device_pointer(scales, src_on_host, "cache_gather: scales", &scales_dev);
    if (st.code != kLaunchOk) return st;
  }
  // 16-byte groups need every row to start on a 16-byte boundary, in src and in out.
  const int64_t in_size = element_size(src_dtype);
  const int64_t v = 16 / in_size;
  const bool vec = D % v == 0 && aligned(src_dev, 16) &&
                   aligned(out, std::min<int64_t>(16, v * element_size(out_dtype)));
  const float* sc = static_cast<const float*>(scales_dev);
  switch (src_dtype) {
    case kF32:
      err = launch_out<float>(out_dtype, vec, src_dev, sc, rows, B, N, D, out, status, stream);
      break;
    case kF16:
      err = launch_out<__half>(out_dtype, vec, src_dev, sc, rows, B, N, D, out, status, stream);
      break;
    case kBF16:
      err = launch_out<__nv_bfloat16>(out_dtype, vec, src_dev, sc, rows, B, N, D, out, status,
                                      stream);
      break;
    case kI8:
      err = launch_out<int8_t>(out_dtype, vec, src_dev, sc, rows, B, N, D, out, status, stream);
      break;
    default:
      return {kLaunchBadArgument, "cache_gather: unsupported storage dtype code"};
  }
  if (err != cudaSuccess) return cuda_error("cache_gather: launch", err);
  return ok();
}

}  // namespace cuda
}  // namespace fastft
