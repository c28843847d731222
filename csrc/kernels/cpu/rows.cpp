#include "rows.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "../../common/codes.h"
#include "../../common/convert.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTFT_X86 1
#endif

namespace fastft {
namespace cpu {

#ifdef FASTFT_X86
bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(const uint16_t* in, float* out,
                                                                 int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = f16_to_f32(in[i]);
}

__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float* in, uint16_t* out,
                                                                 int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = f32_to_f16(in[i]);
}

__attribute__((target("avx2"))) static void i8_to_f32_avx2(const int8_t* in, float scale,
                                                           float* out, int64_t n) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i));
    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(f, s));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]) * scale;
}

__attribute__((target("avx2"))) static void mean_contig_avx2(const float* p, int64_t stride,
                                                             int64_t L, int64_t n, float* out) {
  // Four features at a time: eight independent double accumulators hide the add latency.
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m256d acc[4][2];
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) {
      for (int r = 0; r < 4; ++r) {
        __m256 v = _mm256_loadu_ps(p + (j + r) * stride + l);
        acc[r][0] = _mm256_add_pd(acc[r][0], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        acc[r][1] = _mm256_add_pd(acc[r][1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
      }
    }
    for (int r = 0; r < 4; ++r) {
      double t[4];
      _mm256_storeu_pd(t, _mm256_add_pd(acc[r][0], acc[r][1]));
      double s = (t[0] + t[1]) + (t[2] + t[3]);
      for (int64_t k = l; k < L; ++k) s += static_cast<double>(p[(j + r) * stride + k]);
      out[j + r] = static_cast<float>(s / static_cast<double>(L));
    }
  }
  for (; j < n; ++j) {
    double s = 0.0;
    for (int64_t l = 0; l < L; ++l) s += static_cast<double>(p[j * stride + l]);
    out[j] = static_cast<float>(s / static_cast<double>(L));
  }
}
#else
bool has_f16c() { return false; }
bool has_avx2() { return false; }
#endif

void row_to_f32(const void* in, int dtype, float scale, float* out, int64_t n) {
  switch (dtype) {
    case kF32:
      std::memcpy(out, in, static_cast<size_t>(n) * sizeof(float));
      return;
    case kF16: {
      const uint16_t* h = static_cast<const uint16_t*>(in);
#ifdef FASTFT_X86
      if (has_f16c()) return f16_to_f32_f16c(h, out, n);
#endif
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(h[i]);
      return;
    }
    case kBF16: {
      const uint16_t* h = static_cast<const uint16_t*>(in);
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(h[i]);
      return;
    }
    case kI8: {
      const int8_t* q = static_cast<const int8_t*>(in);
#ifdef FASTFT_X86
      if (has_avx2()) return i8_to_f32_avx2(q, scale, out, n);
#endif
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * scale;
      return;
    }
  }
}

void row_from_f32(const float* in, void* out, int dtype, int64_t n) {
  switch (dtype) {
    case kF32:
      std::memcpy(out, in, static_cast<size_t>(n) * sizeof(float));
      return;
    case kF16: {
      uint16_t* h = static_cast<uint16_t*>(out);
#ifdef FASTFT_X86
      if (has_f16c()) return f32_to_f16_f16c(in, h, n);
#endif
      for (int64_t i = 0; i < n; ++i) h[i] = f32_to_f16(in[i]);
      return;
    }
    case kBF16: {
      uint16_t* h = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(in[i]);
      return;
    }
  }
}

float quantize_row_i8(const float* in, int8_t* out, int64_t n) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(in[i]);
    amax = a > amax ? a : amax;  // a max the compiler vectorizes; it skips NaN, hence:
    nan |= a != a;
  }
  // A NaN anywhere makes the scale NaN (as torch.amax in the reference), so the builder's
  // check of the scales sees it; an Inf makes it Inf.
  const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
  if (!(scale > 0.0f) || !std::isfinite(scale)) {  // an all-zero row, or a NaN/Inf one
    std::memset(out, 0, static_cast<size_t>(n));
    return scale;
  }
  // Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to the nearest
  // integer, ties to even (the default rounding mode), exactly as torch.round does; unlike
  // nearbyint it needs no libm call and vectorizes. |in / scale| <= 127 (+ rounding) here.
  const float magic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    float q = (in[i] / scale + magic) - magic;
    q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
    out[i] = static_cast<int8_t>(q);
  }
  return scale;
}

void mean_over_contiguous_l(const float* p, int64_t stride, int64_t L, int64_t n, float* out) {
#ifdef FASTFT_X86
  if (has_avx2()) return mean_contig_avx2(p, stride, L, n, out);
#endif
  for (int64_t j = 0; j < n; ++j) {
    double s = 0.0;
    for (int64_t l = 0; l < L; ++l) s += static_cast<double>(p[j * stride + l]);
    out[j] = static_cast<float>(s / static_cast<double>(L));
  }
}

}  // namespace cpu
}  // namespace fastft
