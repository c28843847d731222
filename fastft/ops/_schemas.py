"""Schemas, fake (meta) implementations and argument checks of the fastft ops.

The checks live here so that the reference and every native kernel reject bad input with
the same :class:`fastft.FastFTError` subclasses and messages. Checks that need the *values*
of ``rows`` (range, duplicates) are done by each implementation itself: the native kernels
do them in C++ during their pass instead of paying extra passes in Python.
"""

from __future__ import annotations

import torch

from fastft.errors import FastFTIndexError, FastFTValueError

#: How ``cache_write`` reduces the L axis of ``src[B, L, D]``.
POOLS = ("none", "mean", "max", "masked_mean", "first")
#: dtypes a cache may be stored in.
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
#: dtypes activations arrive in and gathers return.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)

torch.library.define(
    "fastft::cache_write",
    "(Tensor src, Tensor rows, Tensor(a!) dst, Tensor(b!) scales, str pool, Tensor? mask=None) -> "
    "()",
)
torch.library.define(
    "fastft::cache_gather",
    "(Tensor src, Tensor scales, Tensor rows, ScalarType out_dtype) -> Tensor",
)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_cache_write(src, rows, dst, scales, pool, mask) -> None:
    """Validate shapes, dtypes and devices of a ``cache_write`` call (not row values)."""
    if pool not in POOLS:
        raise FastFTValueError(
            f"cache_write: unknown pool {pool!r}; use one of {', '.join(POOLS)}."
        )
    if src.dim() != 3:
        raise FastFTValueError(
            f"cache_write: src must be a [B, L, D] view, got shape {tuple(src.shape)}. "
            "Pass a feature map [B, C, H, W] as src.flatten(2).transpose(1, 2) and a [B, D] "
            "batch as src.unsqueeze(1)."
        )
    if src.dtype not in COMPUTE_DTYPES:
        raise FastFTValueError(
            f"cache_write: src dtype {_name(src.dtype)} is not supported; use float32, bfloat16 or "
            "float16."
        )
    B, L, D = src.shape
    if L < 1 and B > 0:
        raise FastFTValueError("cache_write: src has L = 0 positions to pool; nothing to write.")
    if pool == "none" and L != 1:
        raise FastFTValueError(
            f"cache_write: pool='none' needs L = 1 but src has L = {L}; choose a pool "
            "(mean, max, masked_mean, first) or flatten the activation into D."
        )
    if dst.dim() != 2:
        raise FastFTValueError(f"cache_write: dst must be [N, D], got shape {tuple(dst.shape)}.")
    if dst.dtype not in STORAGE_DTYPES:
        raise FastFTValueError(
            f"cache_write: dst dtype {_name(dst.dtype)} is not a storage dtype; use float32, "
            "bfloat16, float16 or int8."
        )
    if dst.shape[1] != D:
        raise FastFTValueError(
            f"cache_write: src has D = {D} features but dst rows hold {dst.shape[1]}."
        )
    if not dst.is_contiguous():
        raise FastFTValueError("cache_write: dst must be contiguous (row-major [N, D]).")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise FastFTValueError(
            f"cache_write: rows must be a 1-D int64 tensor, got {_name(rows.dtype)} of shape "
            f"{tuple(rows.shape)}."
        )
    if rows.shape[0] != B:
        raise FastFTValueError(f"cache_write: {rows.shape[0]} rows given for a batch of B = {B}.")
    if dst.dtype == torch.int8:
        _check_scales("cache_write", scales, dst.shape[0])
    if pool == "masked_mean":
        if mask is None:
            raise FastFTValueError(
                "cache_write: pool='masked_mean' needs mask[B, L] (e.g. the attention_mask)."
            )
        if tuple(mask.shape) != (B, L):
            raise FastFTValueError(
                f"cache_write: mask has shape {tuple(mask.shape)} but src needs [B, L] = [{B}, "
                f"{L}]."
            )
        if mask.dtype not in MASK_DTYPES:
            raise FastFTValueError(
                f"cache_write: mask dtype {_name(mask.dtype)} is not supported; use bool, uint8, "
                "int32, int64 or float32."
            )
        if mask.device != src.device:
            raise FastFTValueError("cache_write: mask must be on the same device as src.")
    elif mask is not None:
        raise FastFTValueError(
            f"cache_write: a mask is only used with pool='masked_mean', not {pool!r}."
        )
    if rows.device != src.device:
        raise FastFTValueError(
            f"cache_write: rows are on {rows.device} but src is on {src.device}; move rows to "
            f"{src.device}."
        )
    if dst.device != src.device and not (
        dst.device.type == "cpu" and src.device.type == "cuda" and dst.is_pinned()
    ):
        raise FastFTValueError(
            f"cache_write: dst is on {dst.device} but src is on {src.device}; a CUDA src may only "
            "write into CUDA memory or pinned host memory."
        )


def check_cache_gather(src, scales, rows, out_dtype) -> None:
    """Validate shapes, dtypes and devices of a ``cache_gather`` call (not row values)."""
    if src.dim() != 2:
        raise FastFTValueError(f"cache_gather: src must be [N, D], got shape {tuple(src.shape)}.")
    if src.dtype not in STORAGE_DTYPES:
        raise FastFTValueError(
            f"cache_gather: src dtype {_name(src.dtype)} is not a storage dtype; use float32, "
            "bfloat16, float16 or int8."
        )
    if not src.is_contiguous():
        raise FastFTValueError("cache_gather: src must be contiguous (row-major [N, D]).")
    if out_dtype not in COMPUTE_DTYPES:
        raise FastFTValueError(
            f"cache_gather: out_dtype {_name(out_dtype)} is not supported; use float32, bfloat16 "
            "or float16."
        )
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise FastFTValueError(
            f"cache_gather: rows must be a 1-D int64 tensor, got {_name(rows.dtype)} of shape "
            f"{tuple(rows.shape)}."
        )
    if src.dtype == torch.int8:
        _check_scales("cache_gather", scales, src.shape[0])


def _check_scales(op: str, scales, n: int) -> None:
    if (
        scales.dtype != torch.float32
        or scales.dim() != 1
        or scales.shape[0] != n
        or not scales.is_contiguous()
    ):
        raise FastFTValueError(
            f"{op}: an int8 cache needs contiguous float32 scales[N] with N = {n}, got "
            f"{_name(scales.dtype)} of shape {tuple(scales.shape)}."
        )


def row_out_of_range(op: str, index: int, value: int, n: int) -> FastFTIndexError:
    return FastFTIndexError(
        f"{op}: rows[{index}] = {value} is outside the cache's {n} rows [0, {n})."
    )


def duplicate_row(op: str, index: int, value: int) -> FastFTIndexError:
    """``rows[index]`` is the first entry (in order) that repeats an earlier one."""
    return FastFTIndexError(
        f"{op}: row {value} appears more than once in one write (rows[{index}] repeats it); "
        "each row of a batch must be distinct."
    )


@torch.library.register_fake("fastft::cache_write")
def _cache_write_fake(src, rows, dst, scales, pool, mask=None) -> None:
    check_cache_write(src, rows, dst, scales, pool, mask)


def gather_device(src: torch.Tensor, rows: torch.Tensor) -> torch.device:
    """Where ``cache_gather`` returns its result: a pinned host cache gathered by CUDA rows
    lands on the rows' device, any other on the cache's."""
    return rows.device if (src.device.type == "cpu" and rows.device.type == "cuda") else src.device


@torch.library.register_fake("fastft::cache_gather")
def _cache_gather_fake(src, scales, rows, out_dtype):
    check_cache_gather(src, scales, rows, out_dtype)
    return src.new_empty(
        (rows.shape[0], src.shape[1]), dtype=out_dtype, device=gather_device(src, rows)
    )
