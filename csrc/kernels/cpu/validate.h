// Checks and small helpers shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../../common/codes.h"

namespace fastft {
namespace cpu {

// Every row in [0, N); with `unique`, no row twice (so parallel writes never race).
inline Status check_rows(const int64_t* rows, int64_t B, int64_t N, bool unique) {
  for (int64_t i = 0; i < B; ++i)
    if (rows[i] < 0 || rows[i] >= N) return {kRowOutOfRange, i};
  if (unique && B > 1) {
    // The first row (in order) that repeats an earlier one, as the CUDA kernel and the
    // reference report it: sort (row, index) pairs; in a run of equal rows every index after
    // the run's first is a repeat, and the smallest of those is the one to name.
    std::vector<std::pair<int64_t, int64_t>> sorted(static_cast<size_t>(B));
    for (int64_t i = 0; i < B; ++i) sorted[static_cast<size_t>(i)] = {rows[i], i};
    std::sort(sorted.begin(), sorted.end());
    int64_t first_repeat = B;
    for (size_t k = 1; k < sorted.size(); ++k)
      if (sorted[k].first == sorted[k - 1].first)
        first_repeat = std::min(first_repeat, sorted[k].second);
    if (first_repeat < B) return {kDuplicateRow, first_repeat};
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
