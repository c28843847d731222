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
from fastft.ops._served import BACKENDS, snapshot


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


def backend_calls(reset: bool = False) -> dict[tuple[str, str], int]:
    """How many fastft op calls each implementation served in this process.

    Returns ``{(op, backend): calls}`` with ``op`` ``"cache_write"`` or ``"cache_gather"``
    and ``backend`` one of :data:`BACKENDS`: ``"reference"`` (the pure-PyTorch kernels, also
    when a CUDA call falls back to them), ``"cpu"`` or ``"cuda"`` (fastft._C's kernels).
    Every call an implementation accepted counts, whether it came through ``torch.ops``,
    these wrappers, or a direct call of ``fastft.ops.reference``; a call whose arguments it
    rejected does not. Calls replayed by a CUDA graph are not seen. ``reset=True`` clears
    the counts after reading them. For example, to check that the native kernels ran::

        fastft.ops.backend_calls(reset=True)
        fastft.ops.cache_gather(cache, scales, rows)
        assert fastft.ops.backend_calls() == {("cache_gather", "cpu"): 1}
    """
    return snapshot(reset)


__all__ = [
    "cache_write",
    "cache_gather",
    "backend_calls",
    "BACKENDS",
    "POOLS",
    "STORAGE_DTYPES",
    "COMPUTE_DTYPES",
]
