"""Native CUDA kernels of the fastft ops (``fastft._C`` built with nvcc), registered for "cuda".

Nothing is registered when ``fastft._C`` was built without CUDA: the reference then serves
CUDA tensors. Kernels run on PyTorch's current stream of the tensors' device.

Where the tensors may live:

- ``cache_write``: ``src`` (and ``rows``, ``mask``) on a CUDA device; ``dst`` (and
  ``scales``) on that device or in pinned host memory, written through its mapped address,
  so a cache larger than the GPU is filled without a staging copy. Such a call reaches this
  kernel because the dispatcher picks the highest-priority backend among the tensor
  arguments, and CUDA outranks CPU.
- ``cache_gather``: ``src`` (and ``scales``) on a CUDA device or pinned host memory; the
  result is on the CUDA device of ``src`` (or of ``rows`` when ``src`` is on the host).

Row checks (range, and duplicates within one write) run on the device, inside the same
launches, so they cost no extra pass and never let a kernel touch a bad row; a bad
``cache_write`` writes nothing. Reading their verdict back is the only host
synchronisation. By default it happens at once, and a bad call raises the same
:class:`fastft.FastFTIndexError` as on the CPU. ``set_sync_checks(False)`` (or
``FASTFT_CUDA_SYNC_CHECKS=0``) defers it: the verdict is copied to pinned memory behind the
kernel, and the error is raised by a later fastft CUDA call once the copy has landed, or by
:func:`raise_pending_errors`, in the thread that made the call. While a CUDA graph is being
captured (on the op's device) the verdict is not read.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import deque

import torch

from fastft._native import cuda_runtime_error, native_module
from fastft.errors import FastFTError, FastFTValueError
from fastft.ops import reference
from fastft.ops._codes import (
    DTYPE_CODES,
    LAUNCH_BAD_ARGUMENT,
    LAUNCH_OK,
    POOL_CODES,
    ROW_KIND_OUT_OF_RANGE,
    ROW_KIND_SHIFT,
    ROWS_OK,
    STATUS_DUPLICATE_ROW,
    STATUS_ROW_OUT_OF_RANGE,
    raise_status,
)
from fastft.ops._schemas import check_cache_gather, check_cache_write, gather_device
from fastft.ops._served import record

_C = native_module()
#: Whether ``fastft._C`` carries CUDA kernels (compiled with nvcc; says nothing of a GPU).
BUILT_WITH_CUDA = _C is not None and bool(_C.build_info().get("cuda", False))


class CudaKernelError(FastFTError, RuntimeError):
    """A fastft CUDA kernel could not be launched (the CUDA runtime reported an error)."""


_sync_checks = os.environ.get("FASTFT_CUDA_SYNC_CHECKS", "1").strip().lower() not in {
    "0",
    "false",
    "no",
    "off",
}
# Per thread: .deferred (inside deferred_row_checks()), .pending (a deque of the thread's
# deferred checks: (op, n_rows, rows, pinned verdict, event)). A thread reads only its own
# verdicts, so no other thread can drain, lose or double them.
_thread = threading.local()


def _pending() -> deque:
    """This thread's queue of deferred row checks."""
    queue = getattr(_thread, "pending", None)
    if queue is None:
        queue = _thread.pending = deque()
    return queue


def set_sync_checks(enabled: bool) -> bool:
    """Choose whether CUDA row checks raise at once (True, default) or later; returns the old value.

    Deferred checks remove the one host synchronisation per call; a bad row still never
    reads or writes out of bounds, and the error surfaces at a later fastft CUDA call of the
    same thread (or its :func:`raise_pending_errors`): each thread reads only its own
    verdicts, so a thread that defers checks should call it before it ends.
    """
    global _sync_checks
    old, _sync_checks = _sync_checks, bool(enabled)
    return old


@contextlib.contextmanager
def deferred_row_checks():
    """Within the block, this thread's CUDA row checks do not synchronise with the host.

    For loops over rows that are valid by construction (the trainer's permutation): a bad
    row still never reads or writes out of bounds, and its error is raised when the block
    ends (or by a later fastft CUDA call). Other threads keep their own setting. A no-op
    for CPU tensors.
    """
    outer = getattr(_thread, "deferred", False)
    _thread.deferred = True
    try:
        yield
    finally:
        _thread.deferred = outer
    if not outer:
        raise_pending_errors()


def raise_pending_errors(wait: bool = True) -> None:
    """Raise the first row error of this thread's earlier deferred-check calls (waiting for
    them if ``wait``). Each thread sees only the verdicts of its own calls."""
    queue = _pending()
    while queue:
        if not wait and not queue[0][4].query():
            return
        # Taken off before the wait (which releases the GIL): a verdict is read exactly once.
        op, n, rows, verdict, event = queue.popleft()
        event.synchronize()
        _raise_verdict(op, int(verdict[0]), rows, n)


def _raise_verdict(op: str, key: int, rows: torch.Tensor, n: int) -> None:
    if key == ROWS_OK:  # else (kind << ROW_KIND_SHIFT) | index; see csrc/kernels/cuda/kernels.h
        return
    kind, index = key >> ROW_KIND_SHIFT, key & ((1 << ROW_KIND_SHIFT) - 1)
    code = STATUS_ROW_OUT_OF_RANGE if kind == ROW_KIND_OUT_OF_RANGE else STATUS_DUPLICATE_ROW
    raise_status(op, (code, index), rows, n)


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (the op's device, which
    need not be the current one)."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _report_rows(  # pragma: cuda
    op: str, scratch: torch.Tensor, rows: torch.Tensor, n: int
) -> None:
    """Read (or defer reading) the row verdict the kernels left in ``scratch[0]``."""
    if _capturing(scratch.device):
        return  # a graph replays without us; the kernels still never touch a bad row
    if _sync_checks and not getattr(_thread, "deferred", False):
        _raise_verdict(op, int(scratch[0]), rows, n)
        return
    verdict, event = _copy_verdict(scratch)
    _pending().append((op, n, rows, verdict, event))


def _copy_verdict(scratch: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:  # pragma: cuda
    """Start copying ``scratch[0]`` to pinned memory behind the kernels: (verdict, event
    recorded after the copy)."""
    verdict = torch.empty(1, dtype=torch.int64, pin_memory=True)
    verdict.copy_(scratch[:1], non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(scratch.device))
    return verdict, event


def _check_launch(op: str, status: tuple[int, str]) -> None:
    code, message = status
    if code == LAUNCH_OK:
        return
    if code == LAUNCH_BAD_ARGUMENT:
        raise FastFTValueError(f"{message}.")
    raise CudaKernelError(f"{message}. The CUDA kernel of fastft.{op} could not run.")


def _runtime_problem() -> str | None:
    """Why the CUDA runtime linked into fastft._C cannot run here (None when it can).

    The usual cause is a driver older than the nvcc fastft was built with; the reference
    implementation then serves CUDA tensors, after one warning, and ``fastft.has_cuda()``
    is False.
    """
    return cuda_runtime_error()


_warned_runtime = False


def _native_usable(device: torch.device) -> bool:
    """True when the CUDA kernels can run; also raises errors left by deferred checks."""
    global _warned_runtime
    problem = _runtime_problem()
    if problem is not None:
        if not _warned_runtime:
            _warned_runtime = True
            warnings.warn(
                f"fastft: the CUDA kernels cannot run ({problem}); using the slower "
                "pure-PyTorch kernels on CUDA tensors.",
                RuntimeWarning,
                stacklevel=4,
            )
        return False
    if not _capturing(device):  # event queries are illegal in a capture
        raise_pending_errors(wait=False)
    return True


def _ptr(t: torch.Tensor | None) -> int:  # pragma: cuda
    return 0 if t is None else t.data_ptr()


def _check_placement(  # pragma: cuda
    op: str, name: str, t: torch.Tensor, device: torch.device
) -> bool:
    """True when ``t`` is pinned host memory, False when it is on ``device``; else raise."""
    if t.device == device:
        return False
    if t.device.type == "cpu" and t.is_pinned():
        return True
    raise FastFTValueError(
        f"{op}: {name} is on {t.device}; with CUDA tensors it must be on {device} or in "
        "pinned host memory (tensor.pin_memory())."
    )


def cache_write(src, rows, dst, scales, pool, mask=None) -> None:  # pragma: cuda
    check_cache_write(src, rows, dst, scales, pool, mask)
    if src.device.type != "cuda":  # only scales on CUDA sends a CPU call here
        raise FastFTValueError(
            f"cache_write: scales are on {scales.device} but src is on {src.device}."
        )
    if not _native_usable(src.device):
        return reference.cache_write(src, rows, dst, scales, pool, mask)
    device = src.device
    on_host = _check_placement("cache_write", "dst", dst, device)
    quantized = dst.dtype == torch.int8
    if quantized and _check_placement("cache_write", "scales", scales, device) != on_host:
        raise FastFTValueError(
            "cache_write: scales must live where dst lives (same device, or both pinned)."
        )
    record("cache_write", "cuda")
    B, L, D = src.shape
    if B == 0:
        return
    rows = rows.contiguous()
    src_stride_b, src_stride_l, src_stride_d = src.stride()
    mask_stride_b, mask_stride_l = mask.stride() if mask is not None else (0, 0)
    # Stream-ordered scratch from PyTorch's caching allocator: no cudaMalloc, no sync.
    scratch = torch.empty(_C.cuda_write_scratch_len(batch=B), dtype=torch.int64, device=device)
    status = _C.cache_write_cuda(  # keywords only, as every fastft._C call (see cpu.py)
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
        scales_ptr=_ptr(scales) if quantized else 0,
        dst_on_host=on_host,
        pool=POOL_CODES[pool],
        mask_ptr=_ptr(mask),
        mask_dtype=DTYPE_CODES[mask.dtype] if mask is not None else 0,
        mask_stride_b=mask_stride_b,
        mask_stride_l=mask_stride_l,
        scratch_ptr=scratch.data_ptr(),
        scratch_len=scratch.numel(),
        device=device.index,
        stream=torch.cuda.current_stream(device).cuda_stream,
    )
    _check_launch("cache_write", status)
    _report_rows("cache_write", scratch, rows, dst.shape[0])


def cache_gather(src, scales, rows, out_dtype):  # pragma: cuda
    check_cache_gather(src, scales, rows, out_dtype)
    device = gather_device(src, rows)
    if device.type != "cuda":
        raise FastFTValueError(
            "cache_gather: a host cache needs rows on the CUDA device that reads it."
        )
    if not _native_usable(device):
        return reference.cache_gather(src, scales, rows, out_dtype)
    on_host = _check_placement("cache_gather", "src", src, device)
    quantized = src.dtype == torch.int8
    if quantized and _check_placement("cache_gather", "scales", scales, device) != on_host:
        raise FastFTValueError(
            "cache_gather: scales must live where src lives (same device, or both pinned)."
        )
    record("cache_gather", "cuda")
    rows = rows.to(device, non_blocking=True).contiguous()
    B, D = rows.shape[0], src.shape[1]
    out = torch.empty((B, D), dtype=out_dtype, device=device)
    if B == 0:
        return out
    scratch = torch.empty(1, dtype=torch.int64, device=device)
    status = _C.cache_gather_cuda(
        src_ptr=src.data_ptr(),
        src_dtype=DTYPE_CODES[src.dtype],
        cache_rows=src.shape[0],
        dim=D,
        scales_ptr=_ptr(scales) if quantized else 0,
        src_on_host=on_host,
        rows_ptr=rows.data_ptr(),
        batch=B,
        out_ptr=out.data_ptr(),
        out_dtype=DTYPE_CODES[out_dtype],
        scratch_ptr=scratch.data_ptr(),
        device=device.index,
        stream=torch.cuda.current_stream(device).cuda_stream,
    )
    _check_launch("cache_gather", status)
    _report_rows("cache_gather", scratch, rows, src.shape[0])
    return out


if BUILT_WITH_CUDA:
    torch.library.register_kernel("fastft::cache_write", "cuda", cache_write)
    torch.library.register_kernel("fastft::cache_gather", "cuda", cache_gather)

__all__ = [
    "BUILT_WITH_CUDA",
    "CudaKernelError",
    "deferred_row_checks",
    "raise_pending_errors",
    "set_sync_checks",
]
