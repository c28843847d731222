"""Input staging for cache builds on a GPU: the copy of chunk i+1 overlaps the work on chunk i.

``staged(chunks, device)`` loads each chunk's inputs on the host, pins them and starts their
copy to the device on a side stream (``non_blocking``), *before* handing the previous chunk
to the caller. While the caller runs the frozen prefix and the cache write of chunk i on the
compute stream, the DMA engine moves chunk i+1. The compute stream waits on an event that
marks the end of each copy, and the device tensors are recorded on the compute stream so the
caching allocator does not reuse their memory while it still reads them.

On a CPU device the chunks pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from fastft import data as fdata


def _tensors(inputs: Any) -> list[torch.Tensor]:  # pragma: cuda
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return [v for v in inputs.values() if isinstance(v, torch.Tensor)]


def _pin(inputs: Any) -> Any:  # pragma: cuda
    pin = lambda t: t if t.is_cuda or t.is_pinned() else t.pin_memory()  # noqa: E731
    if isinstance(inputs, torch.Tensor):
        return pin(inputs)
    return {k: pin(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


class _InFlight:  # pragma: cuda
    """One chunk whose inputs are being copied to the device on the side stream."""

    def __init__(self, chunk, device: torch.device, stream: torch.cuda.Stream):
        self.chunk, self.device = chunk, device
        inputs, self.labels = chunk.load()
        self.host = _pin(inputs)  # kept alive until the copy is done
        with torch.cuda.stream(stream):
            self.inputs = fdata.to_device(self.host, device, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)

    def ready(self):
        """The chunk with its device inputs, usable on the current stream."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.copied)
        for t in _tensors(self.inputs):
            t.record_stream(current)
        inputs, labels = self.inputs, self.labels
        return replace(self.chunk, load=lambda: (inputs, labels))


def staged(chunks: Iterator, device: torch.device) -> Iterator:
    """``chunks`` with their inputs already on ``device`` (see the module docstring)."""
    if device.type != "cuda":
        yield from chunks
        return
    stream = torch.cuda.Stream(device)  # pragma: cuda
    pending: _InFlight | None = None  # pragma: cuda
    for chunk in chunks:  # pragma: cuda
        nxt = _InFlight(chunk, device, stream)  # its copy starts before the previous chunk's work
        if pending is not None:
            yield pending.ready()
        pending = nxt
    if pending is not None:  # pragma: cuda
        yield pending.ready()
