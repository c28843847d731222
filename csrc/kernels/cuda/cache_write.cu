// cache_write on CUDA: pool a strided src[B, L, D] over L, cast or int8-quantize, and
// scatter into rows of dst[N, D]; one pass over src.
//
// Four launches on the caller's stream, no host synchronisation:
//   1. clear the scratch (status word + hash set),
//   2. insert_rows + report_repeats: every row in range and distinct (a hash set in
//      scratch); the first bad row in order is recorded in the status word,
//   3. write_kernel: one block per sample; it returns at once if any row was bad, so a bad
//      call writes nothing.
// dst (and scales) may be pinned host memory written through its mapped device address.
#include "device.cuh"

namespace fastft {
namespace cuda {
namespace {

constexpr unsigned long long kEmpty = ~0ull;  // no valid row (rows are < 2^63) equals it

int64_t table_capacity(int64_t B) {  // a power of two >= 2B: probes stay short
  int64_t cap = 2;
  while (cap < 2 * B) cap *= 2;
  return cap;
}

__device__ __forceinline__ unsigned long long first_slot(unsigned long long key) {
  return (key * 0x9E3779B97F4A7C15ull) >> 20;  // Fibonacci hashing
}

// Pass 1: every row in range goes into the hash set (keys in table[0, cap), and in
// first[0, cap) the smallest index holding that row); out-of-range rows are reported.
__global__ void insert_rows(const int64_t* __restrict__ rows, int64_t B, int64_t N,
                            unsigned long long* __restrict__ status,
                            unsigned long long* __restrict__ table,
                            unsigned long long* __restrict__ first, int64_t cap) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = rows[i];
    if (r < 0 || r >= N) {
      report_row(status, kRowKindOutOfRange, i);
      continue;
    }
    const unsigned long long key = static_cast<unsigned long long>(r);
    unsigned long long slot = first_slot(key);
    for (;;) {
      slot &= static_cast<unsigned long long>(cap - 1);
      const unsigned long long prev = atomicCAS(&table[slot], kEmpty, key);
      if (prev == kEmpty || prev == key) {
        atomicMin(&first[slot], static_cast<unsigned long long>(i));
        break;
      }
      ++slot;  // linear probing; the table is at least half empty
    }
  }
}

// Pass 2 (after pass 1 completed): an index that is not its row's first is a repeat. The
// smallest such index wins the atomicMin, so the row named is the first repeat in order,
// whatever the threads' timing: the same row the CPU kernel and the reference name.
__global__ void report_repeats(const int64_t* __restrict__ rows, int64_t B, int64_t N,
                               unsigned long long* __restrict__ status,
                               const unsigned long long* __restrict__ table,
                               const unsigned long long* __restrict__ first, int64_t cap) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = rows[i];
    if (r < 0 || r >= N) continue;
    const unsigned long long key = static_cast<unsigned long long>(r);
    unsigned long long slot = first_slot(key);
    for (;;) {
      slot &= static_cast<unsigned long long>(cap - 1);
      if (table[slot] == key) break;  // pass 1 put every in-range row in the set
      ++slot;
    }
    if (first[slot] != static_cast<unsigned long long>(i)) report_row(status, kRowKindDuplicate, i);
  }
}

struct WriteArgs {
  const void* src;
  int64_t L, D, sb, sl, sd;
  const int64_t* rows;
  void* dst;
  float* scales;
  int pool;
  const void* mask;
  int mask_dtype;
  int64_t mb, ml;
  const unsigned long long* status;
};

__device__ __forceinline__ bool mask_on(const WriteArgs& a, int64_t offset) {
  switch (a.mask_dtype) {
    case kBool: return static_cast<const uint8_t*>(a.mask)[offset] != 0;
    case kI32: return static_cast<const int32_t*>(a.mask)[offset] != 0;
    case kI64: return static_cast<const int64_t*>(a.mask)[offset] != 0;
    default: return static_cast<const float*>(a.mask)[offset] != 0.0f;
  }
}

// Features [g*V, g*V + V) of sample b at position l, as float. V > 1 only when the D axis
// is contiguous and 16-byte aligned (checked on the host), so one 16-byte load suffices.
template <typename TIn, int V>
__device__ __forceinline__ void load(const WriteArgs& a, int64_t b, int64_t l, int64_t g,
                                     float* v) {
  const TIn* p = static_cast<const TIn*>(a.src) + b * a.sb + l * a.sl;
  if constexpr (V == 1) {
    v[0] = to_f32(p[g * a.sd]);
  } else {
    const Vec<TIn, V> x = *reinterpret_cast<const Vec<TIn, V>*>(p + g * V);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = to_f32(x.v[i]);
  }
}

// Pool group g of sample b over L into out[V], exactly as the CPU kernel does: max keeps
// the first NaN it meets, means accumulate in double and round once to float.
template <typename TIn, int V>
__device__ void pool_group(const WriteArgs& a, int64_t b, int64_t g, float* out) {
  if (a.pool == kPoolNone || a.pool == kPoolFirst) {
    load<TIn, V>(a, b, 0, g, out);
  } else if (a.pool == kPoolMax) {
    load<TIn, V>(a, b, 0, g, out);
    float v[V];
    for (int64_t l = 1; l < a.L; ++l) {
      load<TIn, V>(a, b, l, g, v);
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (!isnan(out[i]) && (v[i] > out[i] || isnan(v[i]))) out[i] = v[i];
    }
  } else {  // kPoolMean, kPoolMaskedMean
    const bool masked = a.pool == kPoolMaskedMean;
    double acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0;
    int64_t count = 0;
    float v[V];
    for (int64_t l = 0; l < a.L; ++l) {
      if (masked && !mask_on(a, b * a.mb + l * a.ml)) continue;
      ++count;
      load<TIn, V>(a, b, l, g, v);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += static_cast<double>(v[i]);
    }
    // A fully masked sample pools to 0, as on the CPU and in the reference.
    const double denom = count > 0 ? static_cast<double>(count) : 1.0;
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = static_cast<float>(acc[i] / denom);
  }
}

// max that propagates NaN (fmaxf skips it): NaN when either argument is NaN.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (isnan(a) || a > b) ? a : b;
}

// Largest value of x over the block (blockDim.x a multiple of 32, at most 1024); NaN when
// any thread's x is NaN.
__device__ float block_max(float x) {
  __shared__ float warp_max[32];
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = x;
  __syncthreads();
  const int warps = blockDim.x / 32;
  x = lane < warps ? warp_max[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename TIn, typename TOut, int V>
__global__ void write_kernel(WriteArgs a, int64_t B, int cache_row) {
  if (*a.status != kRowsOk) return;  // a bad row anywhere: write nothing (uniform exit)
  const int64_t groups = a.D / V;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t r = a.rows[b];
    if constexpr (!std::is_same<TOut, int8_t>::value) {
      Vec<TOut, V>* dst = reinterpret_cast<Vec<TOut, V>*>(static_cast<TOut*>(a.dst) + r * a.D);
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        float v[V];
        pool_group<TIn, V>(a, b, g, v);
        Vec<TOut, V> y;
#pragma unroll
        for (int i = 0; i < V; ++i) y.v[i] = from_f32<TOut>(v[i]);
        dst[g] = y;
      }
    } else {
      // int8: the scale needs the whole pooled row. It is kept in shared memory when it fits
      // (cache_row), else pooled a second time (same inputs, same order: same values).
      extern __shared__ float row[];
      float amax = 0.0f;
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        float v[V];
        pool_group<TIn, V>(a, b, g, v);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          amax = nan_max(fabsf(v[i]), amax);  // a NaN makes the scale NaN, as on the CPU
          if (cache_row) row[g * V + i] = v[i];
        }
      }
      amax = block_max(amax);  // also a barrier: `row` is complete after it
      const float scale = __fdiv_rn(amax, 127.0f);
      // An all-zero row stores 0 with scale 0; a NaN/Inf row stores 0 with its NaN/Inf scale.
      const bool quantize = scale > 0.0f && isfinite(scale);
      if (threadIdx.x == 0) a.scales[r] = scale;
      Vec<int8_t, V>* dst =
          reinterpret_cast<Vec<int8_t, V>*>(static_cast<int8_t*>(a.dst) + r * a.D);
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        float v[V];
        if (cache_row) {
#pragma unroll
          for (int i = 0; i < V; ++i) v[i] = row[g * V + i];
        } else {
          pool_group<TIn, V>(a, b, g, v);
        }
        Vec<int8_t, V> q;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          // round half to even (rintf), clamp to +-127.
          float x = quantize ? rintf(__fdiv_rn(v[i], scale)) : 0.0f;
          x = fminf(fmaxf(x, -127.0f), 127.0f);
          q.v[i] = static_cast<int8_t>(x);
        }
        dst[g] = q;
      }
      __syncthreads();  // `row` and warp_max are reused by the next sample of this block
    }
  }
}

// Shared memory for one pooled float row; beyond this the int8 path pools twice instead.
constexpr int64_t kMaxRowCacheBytes = 32 * 1024;

template <typename TIn, typename TOut, int V>
cudaError_t launch(const WriteArgs& a, int64_t B, cudaStream_t stream) {
  const int threads = threads_for(a.D / V);
  const int64_t blocks = std::min<int64_t>(B, kMaxBlocks);
  const bool cache_row = std::is_same<TOut, int8_t>::value && a.D * 4 <= kMaxRowCacheBytes;
  const size_t smem = cache_row ? static_cast<size_t>(a.D) * 4 : 0;
  write_kernel<TIn, TOut, V><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
      a, B, cache_row ? 1 : 0);
  return cudaGetLastError();
}

template <typename TIn, typename TOut>
cudaError_t launch_vec(bool vec, const WriteArgs& a, int64_t B, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(TIn);
  return vec ? launch<TIn, TOut, V>(a, B, stream) : launch<TIn, TOut, 1>(a, B, stream);
}

template <typename TIn>
cudaError_t launch_dst(int dst_dtype, bool vec, const WriteArgs& a, int64_t B,
                       cudaStream_t stream) {
  switch (dst_dtype) {
    case kF32: return launch_vec<TIn, float>(vec, a, B, stream);
    case kF16: return launch_vec<TIn, __half>(vec, a, B, stream);
    case kBF16: return launch_vec<TIn, __nv_bfloat16>(vec, a, B, stream);
    case kI8: return launch_vec<TIn, int8_t>(vec, a, B, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t element_size(int dtype) { return dtype == kF32 ? 4 : dtype == kI8 ? 1 : 2; }

}  // namespace

int64_t write_scratch_len(int64_t B) { return 1 + 2 * table_capacity(B); }

LaunchStatus cache_write(const void* src, int src_dtype, int64_t B, int64_t L, int64_t D,
                         int64_t sb, int64_t sl, int64_t sd, const int64_t* rows, void* dst,
                         int dst_dtype, int64_t N, float* scales, bool dst_on_host, int pool,
                         const void* mask, int mask_dtype, int64_t mb, int64_t ml,
                         int64_t* scratch, int64_t scratch_len, int device,
                         uintptr_t stream_handle) {
  if (scratch_len < write_scratch_len(B))
    return {kLaunchBadArgument, "cache_write: scratch buffer too small"};
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return cuda_error("cache_write: set device", guard.error());
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  unsigned long long* status = reinterpret_cast<unsigned long long*>(scratch);
  const int64_t cap = table_capacity(B);
  // 0xFF bytes: the status word becomes kRowsOk, every key slot kEmpty and every first
  // index the largest value (so atomicMin keeps the smallest index).
  cudaError_t err = cudaMemsetAsync(scratch, 0xFF,
                                    static_cast<size_t>(1 + 2 * cap) * sizeof(int64_t), stream);
  if (err != cudaSuccess) return cuda_error("cache_write: clear scratch", err);
  if (B == 0) return ok();

  const int64_t check_blocks = std::min<int64_t>(ceil_div(B, 256), kMaxBlocks);
  insert_rows<<<static_cast<unsigned>(check_blocks), 256, 0, stream>>>(
      rows, B, N, status, status + 1, status + 1 + cap, cap);
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("cache_write: launch row check", err);
  report_repeats<<<static_cast<unsigned>(check_blocks), 256, 0, stream>>>(
      rows, B, N, status, status + 1, status + 1 + cap, cap);
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("cache_write: launch row check", err);
  if (D == 0) return ok();

  void* dst_dev = nullptr;
  void* scales_dev = nullptr;
  LaunchStatus st = device_pointer(dst, dst_on_host, "cache_write: dst", &dst_dev);
  if (st.code != kLaunchOk) return st;
  if (dst_dtype == kI8) {
    st = device_pointer(scales, dst_on_host, "cache_write: scales", &scales_dev);
    if (st.code != kLaunchOk) return st;
  }
  const WriteArgs a{src, L, D, sb, sl, sd, rows, dst_dev, static_cast<float*>(scales_dev),
                    pool, mask, mask_dtype, mb, ml, status};
  // 16-byte loads need a contiguous D axis and every (b, l) row start on a 16-byte
  // boundary; the matching stores need dst rows aligned to the output group.
  const int64_t v = 16 / element_size(src_dtype);
  const bool vec = sd == 1 && D % v == 0 && sb % v == 0 && sl % v == 0 &&
                   aligned(src, 16) &&
                   aligned(dst_dev, std::min<int64_t>(16, v * element_size(dst_dtype)));
  switch (src_dtype) {
    case kF32: err = launch_dst<float>(dst_dtype, vec, a, B, stream); break;
    case kF16: err = launch_dst<__half>(dst_dtype, vec, a, B, stream); break;
    case kBF16: err = launch_dst<__nv_bfloat16>(dst_dtype, vec, a, B, stream); break;
    default: return {kLaunchBadArgument, "cache_write: unsupported src dtype code"};
  }
  if (err != cudaSuccess) return cuda_error("cache_write: launch", err);
  return ok();
}

}  // namespace cuda
}  // namespace fastft
