"""Integer codes shared with the C++ kernels (keep in sync with csrc/common/codes.h)."""

from __future__ import annotations

import torch

from fastft.ops._schemas import duplicate_row, row_out_of_range

DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.bool: 4,
    torch.uint8: 4,
    torch.int32: 5,
    torch.int64: 6,
}
POOL_CODES = {"none": 0, "mean": 1, "max": 2, "masked_mean": 3, "first": 4}

# Status returned by the kernels: (code, index into rows).
STATUS_OK = 0
STATUS_ROW_OUT_OF_RANGE = 1
STATUS_DUPLICATE_ROW = 2


def raise_status(op: str, status: tuple[int, int], rows: torch.Tensor, n: int) -> None:
    """Turn a kernel's status into the same FastFTIndexError the reference raises."""
    code, index = status
    if code == STATUS_OK:
        return
    value = int(rows[index])
    if code == STATUS_ROW_OUT_OF_RANGE:
        raise row_out_of_range(op, index, value, n)
    if code == STATUS_DUPLICATE_ROW:
        raise duplicate_row(op, value)
    raise RuntimeError(f"{op}: native kernel returned unknown status {code}")
