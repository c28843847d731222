"""Native CPU kernels of the fastft ops (``fastft._C``), registered for the "cpu" device.

Nothing is registered when the native module is unavailable: the reference then serves CPU.
"""

from __future__ import annotations

import torch

from fastft._native import native_module
from fastft.ops._codes import DTYPE_CODES, POOL_CODES, raise_status
from fastft.ops._schemas import check_cache_gather, check_cache_write

_C = native_module()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def cache_write(src, rows, dst, scales, pool, mask=None) -> None:
    check_cache_write(src, rows, dst, scales, pool, mask)
    B, L, D = src.shape
    if B == 0:
        return
    rows = rows.contiguous()
    if mask is not None:
        mask_code = DTYPE_CODES[mask.dtype]
        mask_strides = mask.stride()
    else:
        mask_code, mask_strides = 0, (0, 0)
    status = _C.cache_write_cpu(
        src.data_ptr(), DTYPE_CODES[src.dtype], B, L, D, *src.stride(),
        rows.data_ptr(), dst.data_ptr(), DTYPE_CODES[dst.dtype], dst.shape[0],
        _ptr(scales) if dst.dtype == torch.int8 else 0, POOL_CODES[pool],
        _ptr(mask), mask_code, *mask_strides, torch.get_num_threads(),
    )
    raise_status("cache_write", status, rows, dst.shape[0])


def cache_gather(src, scales, rows, out_dtype):
    check_cache_gather(src, scales, rows, out_dtype)
    rows = rows.contiguous()
    out = torch.empty((rows.shape[0], src.shape[1]), dtype=out_dtype, device=src.device)
    if rows.shape[0] == 0:
        return out
    status = _C.cache_gather_cpu(
        src.data_ptr(), DTYPE_CODES[src.dtype], src.shape[0], src.shape[1],
        _ptr(scales) if src.dtype == torch.int8 else 0,
        rows.data_ptr(), rows.shape[0], out.data_ptr(), DTYPE_CODES[out_dtype],
        torch.get_num_threads(),
    )
    raise_status("cache_gather", status, rows, src.shape[0])
    return out


if _C is not None:
    torch.library.register_kernel("fastft::cache_write", "cpu", cache_write)
    torch.library.register_kernel("fastft::cache_gather", "cpu", cache_gather)
