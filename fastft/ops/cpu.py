"""Native CPU kernels of the fastft ops (``fastft._C``), registered for the "cpu" device.

Nothing is registered when the native module is unavailable: the reference then serves CPU.
"""

from __future__ import annotations

import torch

from fastft._native import native_module
from fastft.ops._codes import DTYPE_CODES, POOL_CODES, raise_status
from fastft.ops._schemas import check_cache_gather, check_cache_write
from fastft.ops._served import record

_C = native_module()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# fastft._C takes keyword arguments only (see csrc/bindings.cpp): of its many integers, two
# swapped ones would otherwise run and write wrong rows without an error.


def cache_write(src, rows, dst, scales, pool, mask=None) -> None:
    check_cache_write(src, rows, dst, scales, pool, mask)
    record("cache_write", "cpu")
    B, L, D = src.shape
    if B == 0:
        return
    rows = rows.contiguous()
    src_stride_b, src_stride_l, src_stride_d = src.stride()
    mask_stride_b, mask_stride_l = mask.stride() if mask is not None else (0, 0)
    status = _C.cache_write_cpu(
        src_ptr=src.data_ptr(),
        src_dtype=DTYPE_CODES[src.dtype],
        batch=B,
        length=L,
        dim=D,
        src_stride_b=src_stride_b,
        src_stride_l=src_stride_l,
        src_stride_d=src_stride_d,
        rows_ptr=rows.data_ptr(),
        dst_ptr=dst.data_ptr(),
        dst_dtype=DTYPE_CODES[dst.dtype],
        cache_rows=dst.shape[0],
        scales_ptr=_ptr(scales) if dst.dtype == torch.int8 else 0,
        pool=POOL_CODES[pool],
        mask_ptr=_ptr(mask),
        mask_dtype=DTYPE_CODES[mask.dtype] if mask is not None else 0,
        mask_stride_b=mask_stride_b,
        mask_stride_l=mask_stride_l,
        num_threads=torch.get_num_threads(),
    )
    raise_status("cache_write", status, rows, dst.shape[0])


def cache_gather(src, scales, rows, out_dtype):
    check_cache_gather(src, scales, rows, out_dtype)
    record("cache_gather", "cpu")
    rows = rows.contiguous()
    out = torch.empty((rows.shape[0], src.shape[1]), dtype=out_dtype, device=src.device)
    if rows.shape[0] == 0:
        return out
    status = _C.cache_gather_cpu(
        src_ptr=src.data_ptr(),
        src_dtype=DTYPE_CODES[src.dtype],
        cache_rows=src.shape[0],
        dim=src.shape[1],
        scales_ptr=_ptr(scales) if src.dtype == torch.int8 else 0,
        rows_ptr=rows.data_ptr(),
        batch=rows.shape[0],
        out_ptr=out.data_ptr(),
        out_dtype=DTYPE_CODES[out_dtype],
        num_threads=torch.get_num_threads(),
    )
    raise_status("cache_gather", status, rows, src.shape[0])
    return out


if _C is not None:
    torch.library.register_kernel("fastft::cache_write", "cpu", cache_write)
    torch.library.register_kernel("fastft::cache_gather", "cpu", cache_gather)
