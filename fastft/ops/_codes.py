"""Integer codes shared with the C++ kernels, keyed the way the ops need them.

Derived from :data:`fastft._native.NATIVE_CODES`, which fastft compares with the codes the
built ``fastft._C`` reports (csrc/common/codes.h) before it uses any native kernel.
"""

from __future__ import annotations

import torch

from fastft._native import NATIVE_CODES
from fastft.ops._schemas import duplicate_row, row_out_of_range

#: torch dtype -> dtype code (uint8 masks share the bool code).
DTYPE_CODES = {getattr(torch, name): code for name, code in NATIVE_CODES["dtypes"].items()}
#: pool name (fastft.ops.POOLS) -> pool code.
POOL_CODES = dict(NATIVE_CODES["pools"])

# Status returned by the CPU kernels: (code, index into rows).
STATUS_OK = NATIVE_CODES["statuses"]["ok"]
STATUS_ROW_OUT_OF_RANGE = NATIVE_CODES["statuses"]["row_out_of_range"]
STATUS_DUPLICATE_ROW = NATIVE_CODES["statuses"]["duplicate_row"]

# Status returned by a CUDA launch: (code, message); and the row verdict in scratch[0]
# (see csrc/kernels/cuda/kernels.h).
LAUNCH_OK = NATIVE_CODES["cuda_launch"]["ok"]
LAUNCH_BAD_ARGUMENT = NATIVE_CODES["cuda_launch"]["bad_argument"]
ROWS_OK = NATIVE_CODES["cuda_rows"]["rows_ok"]
ROW_KIND_SHIFT = NATIVE_CODES["cuda_rows"]["kind_shift"]
ROW_KIND_OUT_OF_RANGE = NATIVE_CODES["cuda_rows"]["kind_out_of_range"]


def raise_status(op: str, status: tuple[int, int], rows: torch.Tensor, n: int) -> None:
    """Turn a kernel's status into the same FastFTIndexError the reference raises."""
    code, index = status
    if code == STATUS_OK:
        return
    value = int(rows[index])
    if code == STATUS_ROW_OUT_OF_RANGE:
        raise row_out_of_range(op, index, value, n)
    if code == STATUS_DUPLICATE_ROW:
        raise duplicate_row(op, index, value)
    raise RuntimeError(f"{op}: native kernel returned unknown status {code}")
