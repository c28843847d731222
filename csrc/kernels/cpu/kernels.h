// CPU kernels of the fastft ops. Torch-free: raw pointers, sizes, strides (in elements)
// and dtype codes come from Python (fastft/ops/cpu.py), which has validated shapes.
#pragma once
#include <cstdint>

#include "../../common/codes.h"

namespace fastft {
namespace cpu {

// Pool src[B, L, D] (strided) over L, cast/quantize, scatter into dst[rows[b]] (row-major
// [N, D]) and scales[rows[b]] for int8. Rows are checked (range, duplicates) before any
// write, so a bad call leaves dst untouched.
Status cache_write(const void* src, int src_dtype, int64_t B, int64_t L, int64_t D,
                   int64_t stride_b, int64_t stride_l, int64_t stride_d, const int64_t* rows,
                   void* dst, int dst_dtype, int64_t N, float* scales, int pool,
                   const void* mask, int mask_dtype, int64_t mask_stride_b,
                   int64_t mask_stride_l, int num_threads);

// out[b] = dequantize(src[rows[b]]) for a row-major src[N, D]; out is row-major [B, D].
Status cache_gather(const void* src, int src_dtype, int64_t N, int64_t D, const float* scales,
                    const int64_t* rows, int64_t B, void* out, int out_dtype, int num_threads);

}  // namespace cpu
}  // namespace fastft
