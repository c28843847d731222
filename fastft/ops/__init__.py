"""The fastft custom ops, registered with ``torch.library`` in the ``fastft`` namespace.

Importing this package defines the op schemas and fake (meta) implementations, registers
the pure-PyTorch reference as the default kernel, and registers the native CPU (and CUDA,
when built) kernels on top. Call them as ``torch.ops.fastft.cache_write`` /
``torch.ops.fastft.cache_gather`` or through the typed wrappers below.
"""

from __future__ import annotations

import torch

from fastft.ops import _schemas, reference  # noqa: F401  (defines the ops)
from fastft.ops import cpu as _cpu  # noqa: F401  (registers the native CPU kernels)
from fastft.ops import cuda as _cuda  # noqa: F401  (registers the CUDA kernels, when built)
from fastft.ops._schemas import COMPUTE_DTYPES, POOLS, STORAGE_DTYPES


def cache_write(
    src: torch.Tensor,
    rows: torch.Tensor,
    dst: torch.Tensor,
    scales: torch.Tensor,
    pool: str = "none",
    mask: torch.Tensor | None = None,
) -> None:
    """Pool ``src[B, L, D]`` over L, cast or quantize, and write into ``dst[rows]``.

    See :func:`fastft.ops.reference.cache_write` for the exact semantics.
    """
    torch.ops.fastft.cache_write(src, rows, dst, scales, pool, mask)


def cache_gather(
    src: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return ``src[rows]`` dequantized to ``out_dtype`` as a fresh ``[B, D]`` tensor."""
    return torch.ops.fastft.cache_gather(src, scales, rows, out_dtype)


__all__ = ["cache_write", "cache_gather", "POOLS", "STORAGE_DTYPES", "COMPUTE_DTYPES"]
