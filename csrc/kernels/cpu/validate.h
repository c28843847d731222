// Checks and small helpers shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../common/codes.h"

namespace fastft {
namespace cpu {

// Every row in [0, N); with `unique`, no row twice (so parallel writes never race).
inline Status check_rows(const int64_t* rows, int64_t B, int64_t N, bool unique) {
  for (int64_t i = 0; i < B; ++i)
    if (rows[i] < 0 || rows[i] >= N) return {kRowOutOfRange, i};
  if (unique && B > 1) {
    std::vector<int64_t> sorted(rows, rows + B);
    std::sort(sorted.begin(), sorted.end());
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      for (int64_t i = 0; i < B; ++i)
        if (rows[i] == *dup) return {kDuplicateRow, i};
    }
  }
  return {kOk, 0};
}

// Bytes per element of a storage or compute dtype code.
inline int64_t element_size(int dtype) { return dtype == kF32 ? 4 : dtype == kI8 ? 1 : 2; }

// Threads worth starting for `work` elements: small calls stay on one thread, since an
// OpenMP fork costs more than they do.
inline int parallel_threads(int requested, int64_t work) {
  constexpr int64_t kMinWorkPerThread = 1 << 15;
  int64_t useful = work / kMinWorkPerThread;
  if (useful < 1) useful = 1;
  int t = requested > 0 ? requested : 1;
  return static_cast<int>(std::min<int64_t>(t, useful));
}

}  // namespace cpu
}  // namespace fastft
