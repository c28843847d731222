"""CUDA-graph replay of the trainer's step (``fit(..., cuda_graph=True)``).

A head's training step on cached features is tiny: a few small matmuls, their backward and
an AdamW update. On a GPU it is bound by kernel launches and Python, not by arithmetic.
Capturing the whole step (zero-grad, forward, loss, backward, optimizer step) once as a CUDA
graph and replaying it per batch replaces those dozens of launches with one.

How it keeps the results of eager training:

- The first ``WARMUP_STEPS`` full batches are ordinary eager steps (on a side stream, as
  PyTorch requires before a capture): they create the gradients and the optimizer state
  the graph will reuse, and they are real training steps, so nothing is trained twice or
  skipped.
- The graph is then captured (capture runs nothing) and replayed from the next full batch
  on. Each batch's features and labels are copied into the static buffers the graph reads;
  the gather from the cache stays outside the graph, so every cache tier works.
- A batch of another shape (the last, partial batch of an epoch) runs eagerly.
- A step that cannot be captured (a layer that reads a tensor on the host, say) is reported
  once with a warning, and training goes on eagerly: capture executes nothing, so no step is
  lost or done twice.
- Adam/AdamW are made ``capturable`` (their step counters live on the device). What a graph
  cannot follow is refused up front by :func:`graph_unsupported`: a learning-rate schedule
  (the rate is baked into the captured kernels) and DistributedDataParallel (its all-reduce
  hooks run outside the graph).

The CUDA specifics sit in :class:`_CudaGraphs`; the orchestration in :class:`GraphedStep`
only needs ``warm(fn)`` and ``capture(fn) -> replay``, which keeps it checkable on any
device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from fastft.errors import FastFTValueError

#: Eager steps before the capture (PyTorch's recipe uses three).
WARMUP_STEPS = 3

StepFn = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


def graph_unsupported(device: torch.device, cfg, world: int) -> str | None:
    """Why ``cuda_graph=True`` cannot train the fit ``cfg`` (None when it can), as advice."""
    if device.type != "cuda":
        return f"needs a CUDA device, but training runs on {device}; drop cuda_graph=True"
    if cfg.scheduler is not None:
        return (
            f"cannot follow scheduler={cfg.scheduler!r}: the learning rate is baked into the "
            "captured step. Use scheduler=None with cuda_graph=True, or keep the schedule "
            "and drop cuda_graph"
        )
    if cfg.loss == "ce" and cfg.label_smoothing and cfg.class_weights is not None:
        # ATen normalises this loss with masked_select, which reads a size back to the host.
        return (
            "cannot capture loss='ce' with both label_smoothing and class_weights (PyTorch "
            "computes it with a host synchronisation); drop one of them, or cuda_graph"
        )
    if world > 1:
        return (
            "is not supported under torch.distributed (DistributedDataParallel all-reduces "
            "outside the graph); drop cuda_graph=True"
        )
    if not torch.cuda.is_available():
        return "needs a CUDA device, but torch.cuda.is_available() is False"
    return None


def check_cuda_graph(device: torch.device, cfg, world: int) -> None:
    """Raise a FastFTValueError saying why when ``cuda_graph=True`` cannot train ``cfg``."""
    reason = graph_unsupported(device, cfg, world)
    if reason is not None:
        raise FastFTValueError(f"cuda_graph=True {reason}.")


class _CudaGraphs:  # pragma: cuda
    """Warm-up on a side stream and capture with ``torch.cuda.graph``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def warm(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)  # the batch was gathered on the current stream
        with torch.cuda.stream(self.side):
            out = fn()
        current.wait_stream(self.side)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        outer = torch.cuda.current_stream(self.device)
        try:
            # Our own side stream: torch.cuda.graph's default one lives on whichever device
            # was current when it was first made.
            with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=self.side):
                fn()
        except BaseException:
            # When capture_end raises, torch.cuda.graph leaves the capture stream current.
            torch.cuda.set_stream(outer)
            raise
        return graph.replay  # the bound method keeps the graph (and its memory pool) alive


class GraphedStep:
    """Runs ``step(taps, y)`` eagerly for the first full batches, then as a replayed graph.

    ``step`` must return the batch's losses as a detached tensor and may allocate freely;
    ``backend`` provides ``warm`` and ``capture`` (default: CUDA graphs on ``device``).
    """

    def __init__(
        self, step: StepFn, device: torch.device, *, warmup: int = WARMUP_STEPS, backend=None
    ):
        self.step = step
        if int(warmup) < 1:  # gradients and optimizer state must exist before a capture
            raise ValueError(f"warmup must be ≥ 1, got {warmup}")
        self.warmup = int(warmup)
        self.backend = backend if backend is not None else _CudaGraphs(device)
        self.eager_steps = 0
        self.replays = 0
        self.failed: str | None = None  # why the capture failed (then every step is eager)
        self._template: list[tuple[torch.Size, torch.dtype]] | None = None  # the full batch
        self._warm = 0
        self._replay: Callable[[], None] | None = None
        self._taps: list[torch.Tensor] = []
        self._y: torch.Tensor | None = None
        self._losses: torch.Tensor | None = None
        self._losses_like: torch.Tensor | None = None  # the last eager step's losses

    def __call__(self, taps: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Train on one batch; returns its losses (valid until the next call)."""
        tensors = [*taps, y]
        if self._template is None:  # an epoch's first batch has the full batch size
            self._template = _signature(tensors)
        if self.failed is not None or _signature(tensors) != self._template:
            return self._eager(taps, y)
        if self._replay is None:
            if self._warm < self.warmup:
                self._warm += 1
                return self.backend.warm(lambda: self._eager(taps, y))
            try:
                self._capture(taps, y)
            except RuntimeError as exc:
                # Something in the step synchronises with the host (a data-dependent branch in
                # a layer, say). Capture runs no kernels, so nothing was trained: go on eagerly.
                # The error of capture_end only says that an earlier one spoilt the capture.
                cause = exc.__context__ if isinstance(exc.__context__, Exception) else exc
                self.failed = f"{type(cause).__name__}: {cause}".splitlines()[0]
                self._replay = None
                warnings.warn(
                    f"fastft: cuda_graph=True could not capture the training step ({self.failed}); "
                    "training goes on without a graph, with the same results.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return self._eager(taps, y)
        for buffer, t in zip(self._taps, taps):
            buffer.copy_(t)
        self._y.copy_(y)
        self._replay()
        self.replays += 1
        return self._losses

    def _eager(self, taps, y) -> torch.Tensor:
        self.eager_steps += 1
        losses = self.step(taps, y)
        self._losses_like = losses
        return losses

    def _capture(self, taps, y) -> None:
        # Static buffers allocated outside the capture: the graph reads and writes these
        # addresses on every replay.
        self._taps = [torch.empty_like(t) for t in taps]
        self._y = torch.empty_like(y)
        self._losses = torch.empty_like(self._losses_like)

        def captured() -> None:
            self._losses.copy_(self.step(self._taps, self._y))

        self._replay = self.backend.capture(captured)


def _signature(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Size, torch.dtype]]:
    return [(t.shape, t.dtype) for t in tensors]
