"""Pure-PyTorch reference of the fastft ops: the fallback path and the tests' oracle.

Semantics (every native kernel must match them):

``cache_write(src[B, L, D], rows[B], dst[N, D], scales[N], pool, mask)``
    1. ``x = src.float()``; pool over L: ``none``/``first`` take ``x[:, 0]``, ``mean`` the
       mean, ``max`` the maximum (NaN propagates), ``masked_mean`` the mean over positions
       where ``mask != 0``, ignoring whatever the other positions hold (a row whose mask is
       all zero pools to 0).
    2. Cast to ``dst.dtype`` with round-to-nearest-even, or, for int8, quantize each row
       symmetrically: ``scale = max|x| / 127`` (float32), ``q = round_half_even(x / scale)``
       clamped to [-127, 127]; an all-zero row gets ``scale = 0`` and ``q = 0``; a row
       holding a NaN gets a NaN scale (an Inf, an Inf scale) and ``q = 0``, so the
       builder's finiteness check of the scales catches it. The
       dequantized value ``q * scale`` is within half a step (``scale / 2``) of ``x``.
    3. Write into ``dst[rows[b]]`` (and ``scales[rows[b]]``). Rows must be in range and
       distinct.

``cache_gather(src[N, D], scales[N], rows[B], out_dtype)``
    ``src[rows].float()`` (times ``scales[rows]`` for int8), cast to ``out_dtype``.
"""

from __future__ import annotations

import torch

from fastft.ops._schemas import (
    check_cache_gather,
    check_cache_write,
    duplicate_row,
    gather_device,
    row_out_of_range,
)
from fastft.ops._served import record


def check_rows(op: str, rows: torch.Tensor, n: int, unique: bool) -> None:
    """Raise a FastFTIndexError when a row is out of [0, n) (or repeated, if ``unique``)."""
    if rows.numel() == 0:
        return
    bad = ((rows < 0) | (rows >= n)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise row_out_of_range(op, i, int(rows[i]), n)
    if unique and rows.numel() > 1:
        # The first row (in order) that repeats an earlier one, as the kernels name it: in
        # rows sorted stably, an entry equal to its predecessor is a repeat.
        values, order = torch.sort(rows, stable=True)
        repeats = order[1:][values[1:] == values[:-1]]
        if repeats.numel():
            i = int(repeats.min())
            raise duplicate_row(op, i, int(rows[i]))


def pool_rows(
    src: torch.Tensor,
    pool: str,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reduce ``src[B, L, D]`` over L in ``dtype`` (float32 as ``cache_write`` does; tests
    pass float64 for an exact oracle)."""
    x = src.to(dtype)
    if pool in ("none", "first"):
        return x[:, 0]
    if pool == "mean":
        return x.mean(dim=1)
    if pool == "max":
        return x.amax(dim=1)
    if pool == "masked_mean":
        # Masked-out positions are left out, not multiplied by 0: a NaN/Inf there (padding
        # garbage) must not reach the result, as in the kernels, which skip them.
        on = mask != 0
        kept = torch.where(on.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))
        return kept.sum(dim=1) / on.sum(dim=1, keepdim=True).to(dtype).clamp_min(1.0)
    raise AssertionError(pool)  # rejected by check_cache_write


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of float32 ``x[B, D]`` → (q int8, scale float32)."""
    amax = x.abs().amax(dim=1)  # NaN when the row holds a NaN, Inf for an Inf
    # Divided by a tensor, not the number 127: on CUDA torch turns division by a Python
    # scalar into a multiplication by its reciprocal, a last-bit difference from the CPU
    # (and from the kernels, which divide exactly).
    scale = amax / torch.full_like(amax, 127.0)
    ok = (scale > 0) & torch.isfinite(scale)  # else the row stores 0s (all-zero, NaN or Inf)
    safe = torch.where(ok, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(1)).clamp_(-127, 127)
    q = torch.where(ok.unsqueeze(1), q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def cache_write(src, rows, dst, scales, pool, mask=None) -> None:
    check_cache_write(src, rows, dst, scales, pool, mask)
    record("cache_write", "reference")
    if (
        src.device != dst.device
    ):  # CUDA activations into a pinned host cache (the CUDA kernel's case)
        src, rows = src.to(dst.device), rows.to(dst.device)
        mask = None if mask is None else mask.to(dst.device)
    check_rows("cache_write", rows, dst.shape[0], unique=True)
    if src.shape[0] == 0:
        return
    pooled = pool_rows(src, pool, mask)
    if dst.dtype == torch.int8:
        q, s = quantize_int8(pooled)
        dst[rows] = q.to(dst.device)
        scales[rows] = s.to(scales.device)
    else:
        dst[rows] = pooled.to(dst.dtype).to(dst.device)


def cache_gather(src, scales, rows, out_dtype):
    check_cache_gather(src, scales, rows, out_dtype)
    record("cache_gather", "reference")
    device = gather_device(src, rows)  # where the CUDA kernel's result lands too
    rows = rows.to(src.device)
    check_rows("cache_gather", rows, src.shape[0], unique=False)
    x = src[rows].to(torch.float32)
    if src.dtype == torch.int8:
        x = x * scales[rows].unsqueeze(1)
    return x.to(out_dtype).to(device)


# The reference is the default kernel for every device; native kernels override it per device.
torch.library.register_kernel("fastft::cache_write", None, cache_write)
torch.library.register_kernel("fastft::cache_gather", None, cache_gather)
