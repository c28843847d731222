// Row conversions float32 <-> storage dtypes, the inner loops of both CPU kernels.
//
// Each has a portable scalar version and, on x86, a vector version selected at run time
// (F16C / AVX2), so the module is built without -march flags and still runs fast.
#pragma once
#include <cstdint>

namespace fastft {
namespace cpu {

// out[i] = float(in[i]) (* scale for int8). dtype: kF32, kF16, kBF16 or kI8.
void row_to_f32(const void* in, int dtype, float scale, float* out, int64_t n);

// out[i] = in[i] rounded to nearest-even in dtype (kF32, kF16 or kBF16).
void row_from_f32(const float* in, void* out, int dtype, int64_t n);

// Symmetric int8 quantization of one row: returns scale = max|x| / 127 (0 for a zero row)
// and writes q[i] = clamp(round_half_even(x[i] / scale), -127, 127).
float quantize_row_i8(const float* in, int8_t* out, int64_t n);

// Whether the vector paths are in use on this processor (reported by build_info()).
bool has_f16c();
bool has_avx2();

}  // namespace cpu
}  // namespace fastft

namespace fastft {
namespace cpu {

// out[j] = float(mean(p[j * stride + l] for l < L)) for j < n, accumulating in double.
// The fast path for an NCHW feature map seen as [B, HW, C]: L (= HW) is the contiguous axis.
void mean_over_contiguous_l(const float* p, int64_t stride, int64_t L, int64_t n, float* out);

}  // namespace cpu
}  // namespace fastft
