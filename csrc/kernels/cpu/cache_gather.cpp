// cache_gather on the CPU: read rows of the cache and dequantize them into a fresh
// [B, D] tensor in one pass (float32 rows are written in place; others go through a small
// float buffer that stays in L1).
#include <algorithm>
#include <cstring>

#include "kernels.h"
#include "rows.h"
#include "validate.h"

namespace fastft {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;


}  // namespace

Status cache_gather(const void* src, int src_dtype, int64_t N, int64_t D, const float* scales,
                    const int64_t* rows, int64_t B, void* out, int out_dtype, int num_threads) {
  Status st = check_rows(rows, B, N, /*unique=*/false);
  if (st.code != kOk || B == 0 || D == 0) return st;

  const char* src_bytes = static_cast<const char*>(src);
  char* out_bytes = static_cast<char*>(out);
  const int64_t in_size = element_size(src_dtype);
  const int64_t out_size = element_size(out_dtype);
  const int threads = parallel_threads(num_threads, B * D);

  if (src_dtype == out_dtype) {  // plain copy of rows
    const size_t row_bytes = static_cast<size_t>(D * in_size);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(out_bytes + b * D * out_size, src_bytes + rows[b] * D * in_size, row_bytes);
    return st;
  }

  const int64_t chunks = (D + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < B * chunks; ++task) {
    const int64_t b = task / chunks;
    const int64_t d0 = (task % chunks) * kChunk;
    const int64_t n = std::min(kChunk, D - d0);
    const float scale = src_dtype == kI8 ? scales[rows[b]] : 1.0f;
    const char* in = src_bytes + (rows[b] * D + d0) * in_size;
    char* dst = out_bytes + (b * D + d0) * out_size;
    if (out_dtype == kF32) {
      row_to_f32(in, src_dtype, scale, reinterpret_cast<float*>(dst), n);
    } else {
      float buf[kChunk];
      row_to_f32(in, src_dtype, scale, buf, n);
      row_from_f32(buf, dst, out_dtype, n);
    }
  }
  return st;
}

}  // namespace cpu
}  // namespace fastft
