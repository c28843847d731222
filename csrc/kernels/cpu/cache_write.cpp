// cache_write on the CPU: one pass over src, pooling into a small per-task accumulator,
// then cast (or int8-quantize) straight into the destination rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../common/convert.h"
#include "kernels.h"
#include "rows.h"
#include "validate.h"

namespace fastft {
namespace cpu {
namespace {

// Features pooled per task. Small enough that the accumulators stay in L1, large enough
// that a contiguous D axis vectorizes and an NCHW view (D strided) keeps few lines live.
constexpr int64_t kChunk = 64;

template <typename T>
inline float load(const T* p);
template <>
inline float load<float>(const float* p) { return *p; }
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };
template <>
inline float load<f16_t>(const f16_t* p) { return f16_to_f32(p->bits); }
template <>
inline float load<bf16_t>(const bf16_t* p) { return bf16_to_f32(p->bits); }

inline bool mask_on(const void* mask, int dtype, int64_t offset) {
  switch (dtype) {
    case kBool: return static_cast<const uint8_t*>(mask)[offset] != 0;
    case kI32: return static_cast<const int32_t*>(mask)[offset] != 0;
    case kI64: return static_cast<const int64_t*>(mask)[offset] != 0;
    default: return static_cast<const float*>(mask)[offset] != 0.0f;
  }
}

struct WriteArgs {
  const void* src;
  int64_t L, D, sb, sl, sd;
  int pool;
  const void* mask;
  int mask_dtype;
  int64_t mb, ml;
};

// Pool features [d0, d0 + n) of sample b into out[0..n) (float32).
// Mean-type pools accumulate in double: the result is then the exactly rounded mean up to
// one float rounding, more accurate than a float32 reduction.
template <typename T, bool kContiguousD>
void pool_chunk(const WriteArgs& a, int64_t b, int64_t d0, int64_t n, float* out) {
  const T* base = static_cast<const T*>(a.src) + b * a.sb + d0 * a.sd;
  const int64_t sd = kContiguousD ? 1 : a.sd;
  switch (a.pool) {
    case kPoolNone:
    case kPoolFirst:
      for (int64_t j = 0; j < n; ++j) out[j] = load(base + j * sd);
      return;
    case kPoolMax: {
      for (int64_t j = 0; j < n; ++j) out[j] = load(base + j * sd);
      for (int64_t l = 1; l < a.L; ++l) {
        const T* p = base + l * a.sl;
        for (int64_t j = 0; j < n; ++j) {
          const float v = load(p + j * sd);
          // NaN propagates, as torch.amax does.
          if (!std::isnan(out[j]) && (v > out[j] || std::isnan(v))) out[j] = v;
        }
      }
      return;
    }
    case kPoolMean:
    case kPoolMaskedMean: {
      double acc[kChunk];
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0;
      int64_t count = 0;
      for (int64_t l = 0; l < a.L; ++l) {
        if (a.pool == kPoolMaskedMean && !mask_on(a.mask, a.mask_dtype, b * a.mb + l * a.ml))
          continue;
        ++count;
        const T* p = base + l * a.sl;
        for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(load(p + j * sd));
      }
      // A fully masked row pools to 0 (as sentence encoders do with a clamped denominator).
      const double denom = count > 0 ? static_cast<double>(count) : 1.0;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(acc[j] / denom);
      return;
    }
  }
}

template <typename T>
void pool_range(const WriteArgs& a, int64_t b, int64_t d0, int64_t n, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.pool == kPoolMean && a.sl == 1 && a.L > 1) {
      const float* base = static_cast<const float*>(a.src) + b * a.sb + d0 * a.sd;
      return mean_over_contiguous_l(base, a.sd, a.L, n, out);
    }
  }
  if (a.sd == 1)
    pool_chunk<T, true>(a, b, d0, n, out);
  else
    pool_chunk<T, false>(a, b, d0, n, out);
}

using PoolFn = void (*)(const WriteArgs&, int64_t, int64_t, int64_t, float*);

PoolFn pool_fn(int src_dtype) {
  switch (src_dtype) {
    case kF16: return &pool_range<f16_t>;
    case kBF16: return &pool_range<bf16_t>;
    default: return &pool_range<float>;
  }
}


}  // namespace

Status cache_write(const void* src, int src_dtype, int64_t B, int64_t L, int64_t D,
                   int64_t stride_b, int64_t stride_l, int64_t stride_d, const int64_t* rows,
                   void* dst, int dst_dtype, int64_t N, float* scales, int pool,
                   const void* mask, int mask_dtype, int64_t mask_stride_b,
                   int64_t mask_stride_l, int num_threads) {
  Status st = check_rows(rows, B, N, /*unique=*/true);
  if (st.code != kOk || B == 0 || D == 0) return st;

  const WriteArgs a{src, L, D, stride_b, stride_l, stride_d, pool,
                    mask, mask_dtype, mask_stride_b, mask_stride_l};
  const PoolFn pool_into = pool_fn(src_dtype);
  const int threads = parallel_threads(num_threads, B * L * D);
  char* dst_bytes = static_cast<char*>(dst);
  const int64_t esize = element_size(dst_dtype);

  if (dst_dtype == kI8) {
    // The scale needs the whole pooled row, so a task is one sample.
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> row(static_cast<size_t>(D));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t d0 = 0; d0 < D; d0 += kChunk)
          pool_into(a, b, d0, std::min(kChunk, D - d0), row.data() + d0);
        int8_t* q = reinterpret_cast<int8_t*>(dst_bytes) + rows[b] * D;
        scales[rows[b]] = quantize_row_i8(row.data(), q, D);
      }
    }
    return st;
  }

  const int64_t chunks = (D + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < B * chunks; ++task) {
    const int64_t b = task / chunks;
    const int64_t d0 = (task % chunks) * kChunk;
    const int64_t n = std::min(kChunk, D - d0);
    float pooled[kChunk];
    pool_into(a, b, d0, n, pooled);
    row_from_f32(pooled, dst_bytes + (rows[b] * D + d0) * esize, dst_dtype, n);
  }
  return st;
}

}  // namespace cpu
}  // namespace fastft
