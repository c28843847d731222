// Integer codes shared with Python. bindings.cpp exports them through codes(), and
// fastft/_native.py compares that with its own table (NATIVE_CODES) when it loads fastft._C:
// a change here must be made there too, or fastft will not use the built module.
#pragma once
#include <cstdint>

namespace fastft {

enum DType : int {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kI8 = 3,
  kBool = 4,  // also uint8 masks
  kI32 = 5,
  kI64 = 6,
};

enum Pool : int {
  kPoolNone = 0,
  kPoolMean = 1,
  kPoolMax = 2,
  kPoolMaskedMean = 3,
  kPoolFirst = 4,
};

// A kernel's result: `code` and the position in `rows` it concerns.
enum StatusCode : int {
  kOk = 0,
  kRowOutOfRange = 1,
  kDuplicateRow = 2,
  kBadArgument = 3,
};

struct Status {
  int code;
  int64_t index;
};

}  // namespace fastft
