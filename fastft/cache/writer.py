"""Running the frozen prefix on chunks of data and writing its activations into storage.

:class:`Writer` does one chunk: load, transform (seeded per chunk), run the prefix, check,
``cache_write`` every tap into its rows, store the labels. What the activations look like
and the checks on them are in :mod:`~fastft.cache.activations`; the loop that drives a
writer over the chunks a build still needs is in :mod:`~fastft.cache.job`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastft import data as fdata
from fastft.cache import lengths
from fastft.cache.activations import (
    as_bld,
    check_exact,
    check_finite,
    describe_inputs,
    tap_shape,
    taps_of,
)
from fastft.cache.fingerprint import accepts_generator
from fastft.cache.layout import TapInfo, TapStorage, dtype_str, row_bytes, str_dtype
from fastft.cache.telemetry import Timer
from fastft.data.source_base import Chunk, Source
from fastft.errors import CacheCorruptError, DataError, FastFTError, FastFTValueError

log = logging.getLogger("fastft.cache")


# ---------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """How a cache is built (validated, see :func:`fastft.cache.build.settings`)."""

    dtype: str
    storage_dtype: torch.dtype
    tier: str
    views: int
    transform: Callable | None
    pool: str
    mask_key: str
    batch_size: int
    num_workers: int
    root: Path
    max_memory: int | None
    progress: bool | str  # a string: the bar's label
    seed: int
    device: torch.device
    amp: str | None = None
    transform_id: str | None = None


@dataclass
class Probe:
    """One chunk run through the prefix ahead of the build (its activations tell the taps'
    widths, hence the size and the tier); the build writes it as its first chunk."""

    chunk: Chunk
    names: list[str]
    tensors: list[torch.Tensor]
    inputs: Any
    labels: torch.Tensor


# ---------------------------------------------------------------------------- chunks of data
def chunks(source: Source, s: Settings, skip: Callable[[int, int, int], bool]) -> Iterator[Chunk]:
    """Every (view, batch of samples) still to compute, in order, with a loader of its data
    (see :meth:`fastft.data.source_base.Source.chunks`)."""
    return source.chunks(s.views, s.batch_size, skip, s.num_workers)


def first_chunk(source: Source, s: Settings) -> Chunk:
    return next(chunks(source, s, lambda v, st, c: (v, st) != (0, 0)))


def chunk_seed(seed: int, view: int, start: int) -> int:
    digest = hashlib.sha256(f"{seed}:{view}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------- the writer
class Writer:
    """Runs the prefix on chunks and writes their taps and labels into the storage."""

    def __init__(self, prefix: nn.Module, s: Settings, n: int, timer: Timer):
        self.prefix, self.s, self.n, self.timer = prefix, s, n, timer
        self.taps: list[TapInfo] | None = None
        self.storages: list[TapStorage] = []
        self.labels: torch.Tensor | None = None
        self._pass_generator = s.transform is not None and accepts_generator(s.transform)
        #: (taps, label layout) read from an interrupted build's manifest: the first chunk of a
        #: resume must produce exactly this layout, else the manifest lied (see LayoutMismatch).
        self.expected_layout: tuple[list[TapInfo], dict] | None = None
        #: The mask key of length-aware batching (batches cut to their longest sample), or None;
        #: set by the build, cleared here if cutting the padding changes what is cached.
        self.trim_key: str | None = None
        #: Inputs of the samples cut the most (the shortest), on which the first cut is checked.
        self.trim_sample: Any = None
        self._trim_checked = False

    def probe(self, source: Source) -> Probe:
        """The first chunk of ``source`` run through the prefix (see :class:`Probe`)."""
        chunk = first_chunk(source, self.s)
        return Probe(chunk, *self.forward(chunk))

    def layout_of(self, probe: Probe) -> tuple[list[TapInfo], dict]:
        return self.layout(probe.names, probe.tensors, probe.labels)

    def forward(self, chunk: Chunk) -> tuple[list[str], list[torch.Tensor], Any, torch.Tensor]:
        """(tap names, tap activations, inputs, labels) of one chunk: one prefix call."""
        inputs, labels = chunk.load()
        inputs = fdata.to_device(inputs, self.s.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.s.transform is not None:
                inputs = self._call(
                    "the transform", lambda: self._transform(inputs, chunk), chunk, inputs
                )
            with torch.autocast(
                self.s.device.type, dtype=torch.bfloat16, enabled=self.s.amp == "bf16"
            ):
                out, inputs = self._run_prefix(inputs, chunk)
            names, tensors = taps_of(out, self.prefix)
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)  # pragma: cuda
        self.timer.prefix += time.perf_counter() - t0
        self.timer.prefix_calls += 1
        return names, tensors, inputs, labels

    def _run_prefix(self, inputs: Any, chunk: Chunk) -> tuple[Any, Any]:
        """(the prefix's output, the inputs it ran on): the batch cut to its longest sample
        under length-aware batching. At the first cut, the samples cut the most
        (``trim_sample``, else this batch) are run uncut and cut, in fp32: if their rows differ
        (a prefix that does not honour the mask), batches are no longer cut. The first cut
        batch, longest first, may lose a single pad: too little to show a dependence."""

        def run(x: Any) -> Any:
            return self._call("the frozen prefix", lambda: self.prefix(x), chunk, x)

        if self.trim_key is None or not isinstance(inputs, dict):
            return run(inputs), inputs
        cut = lengths.trim(inputs, self.trim_key)
        if cut is inputs or self._trim_checked:
            return run(cut), cut
        self._trim_checked = True
        sample = inputs
        if self.trim_sample is not None:
            sample = fdata.to_device(self.trim_sample, self.s.device)
        with torch.autocast(self.s.device.type, enabled=False):
            full = run(sample)
            try:  # a tensor that only happens to be as long as the mask may not take the cut
                short = run(lengths.trim(sample, self.trim_key))
            except DataError:
                short = None
            same = short is not None and self._same_rows(full, sample, short)
        if same:
            return run(cut), cut
        log.info(
            "length-aware batching off: the frozen part's output changes when the padding after "
            "the last token (inputs[%r]) is cut, so every batch runs at full length.",
            self.trim_key,
        )
        self.trim_key = None
        return run(inputs), inputs

    def _same_rows(self, full: Any, inputs: dict, short: Any) -> bool:
        """Whether the cut batch gives the rows the full one would cache (up to fp32 rounding)."""
        mask_full = inputs[self.trim_key]
        mask_cut = lengths.trim(inputs, self.trim_key)[self.trim_key]
        a = [lengths.per_sample(x, self.s.pool, mask_full) for x in taps_of(full, self.prefix)[1]]
        b = [lengths.per_sample(x, self.s.pool, mask_cut) for x in taps_of(short, self.prefix)[1]]
        if any(x is None for x in a + b):
            return False
        return lengths.same_outputs(a, b, bf16=False)

    def _call(self, what: str, fn: Callable[[], Any], chunk: Chunk, inputs: Any) -> Any:
        """``fn()``; an exception from user code (the prefix, the transform) becomes a DataError
        naming the samples and their input shapes, with the original as its cause."""
        try:
            return fn()
        except FastFTError:
            raise
        except Exception as exc:
            view = f" (view {chunk.view})" if self.s.views > 1 else ""
            raise DataError(
                f"{what} failed on {chunk.samples}{view} "
                f"with inputs {describe_inputs(inputs)}: {type(exc).__name__}: {exc}. Check that "
                "the data have the shape, dtype and device the model takes."
            ) from exc

    def _transform(self, inputs: Any, chunk: Chunk) -> Any:
        # Each chunk's randomness depends only on (seed, view, start): views are reproducible
        # and a resumed build draws exactly what an uninterrupted one would have. Python's and
        # NumPy's global generators are seeded too (transforms draw from them as often as from
        # torch's), and every generator is put back as it was afterwards.
        seed = chunk_seed(self.s.seed, chunk.view, chunk.start)
        devices = [self.s.device] if self.s.device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                if self._pass_generator:
                    g = torch.Generator(device=self.s.device).manual_seed(seed)
                    return self.s.transform(inputs, generator=g)
                return self.s.transform(inputs)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def layout(
        self, names: list[str], tensors: list[torch.Tensor], labels: torch.Tensor
    ) -> tuple[list[TapInfo], dict]:
        """Taps and label layout from the first chunk's activations."""
        taps = []
        for name, x in zip(names, tensors):
            if x.dim() < 1:
                raise DataError(
                    f"tap {name!r} has shape {tuple(x.shape)}; a frozen activation needs [B, ...]."
                )
            if (
                x.dim() == 1
            ):  # one number per sample (a length, a score): a row of one, never pooled
                dtype, source = (
                    (self.s.storage_dtype, None)
                    if x.is_floating_point()
                    else (torch.float32, x.dtype)
                )
                taps.append(TapInfo(name, 1, (), dtype, "none", source))
            elif x.is_floating_point():
                shape = tap_shape(x, self.s.pool)
                taps.append(
                    TapInfo(
                        name,
                        int(torch.Size(shape).numel()),
                        shape,
                        self.s.storage_dtype,
                        self.s.pool,
                    )
                )
            else:  # masks, token ids: kept whole and exact (fp32 holds integers up to 2**24)
                shape = tuple(x.shape[1:])
                taps.append(
                    TapInfo(
                        name, int(torch.Size(shape).numel()), shape, torch.float32, "none", x.dtype
                    )
                )
        label_layout = {"dtype": dtype_str(labels.dtype), "shape": list(labels.shape[1:])}
        return taps, label_layout

    def total_bytes(self, taps: list[TapInfo], labels: dict) -> int:
        label_row = (
            torch.Size(labels["shape"]).numel()
            * torch.empty((), dtype=str_dtype(labels["dtype"])).element_size()
        )
        return self.n * (self.s.views * sum(row_bytes(t.dim, t.dtype) for t in taps) + label_row)

    def write(self, chunk: Chunk, names, tensors, inputs, labels) -> None:
        """Check and write one chunk's activations and labels into the storage."""
        if self.expected_layout is not None:
            taps, label_layout = self.layout(names, tensors, labels)
            expected_taps, expected_labels = self.expected_layout
            if taps != expected_taps or label_layout != {
                k: expected_labels.get(k) for k in label_layout
            }:
                raise LayoutMismatch(
                    f"the interrupted build's manifest describes taps {expected_taps} and labels "
                    f"{expected_labels}, but the prefix gives {taps} and {label_layout}"
                )
            self.expected_layout = None
        t0 = time.perf_counter()
        # Inference mode allows in-place writes into the (normal) storage tensors, which are
        # allocated outside it so that the finished cache holds ordinary tensors.
        with torch.inference_mode():
            self._write(chunk, tensors, inputs, labels)
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)  # pragma: cuda
        self.timer.write += time.perf_counter() - t0
        self.timer.rows_written += chunk.count

    def _write(self, chunk: Chunk, tensors, inputs, labels) -> None:
        if len(tensors) != len(self.taps):
            raise DataError(
                f"the prefix returned {len(tensors)} taps for {chunk.samples} but "
                f"{len(self.taps)} before."
            )
        if int(labels.shape[0]) != chunk.count:
            raise DataError(
                f"a batch of {chunk.count} samples came with {int(labels.shape[0])} labels."
            )
        mask = self._mask(inputs) if self.s.pool == "masked_mean" else None
        positions = chunk.positions  # the samples' own rows, whatever order they were visited in
        for tap, x, store in zip(self.taps, tensors, self.storages):
            pool = tap.pool  # the cache's pool, or 'none' for non-float and one-number taps
            if tap.source_dtype is not None:
                check_exact(x, tap.name, chunk.samples)
            if x.shape[0] != chunk.count or tap_shape(x, pool) != tap.shape:
                raise DataError(
                    f"tap {tap.name!r} has shape {tuple(x.shape)} for {chunk.samples}; "
                    f"expected [{chunk.count}, ...] giving per-sample {tap.shape} as in the first "
                    "batch."
                )
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                x = x.float()  # float64 or integer activations: the kernels take fp32/bf16/fp16
            src = as_bld(x, pool)
            tap_mask = None if pool == "none" else self._tap_mask(mask, src, tap.name)
            dst = store.data
            if dst.device != src.device and not (dst.is_pinned() and src.is_cuda):
                src = src.to(dst.device)  # pragma: cuda
                tap_mask = None if tap_mask is None else tap_mask.to(dst.device)  # pragma: cuda
            rows = (positions + chunk.view * self.n).to(src.device)
            tap_pool = "none" if pool == "none" else self._tap_pool(tap_mask, src)
            torch.ops.fastft.cache_write(src, rows, dst, store.scales, tap_pool, tap_mask)
            if src.is_cuda and dst.device.type == "cpu":
                # The kernel writes the pinned rows through mapped memory: read them only once it
                # has run (the row check may be deferred, and then nothing else waits for it).
                torch.cuda.current_stream(src.device).synchronize()  # pragma: cuda
            check_finite(
                store,
                rows.to(store.data.device),
                tap.name,
                positions,
                chunk.view,
                self.s.views,
            )
        if chunk.view == 0:
            if (
                list(labels.shape[1:]) != list(self.labels.shape[1:])
                or labels.dtype != self.labels.dtype
            ):
                raise DataError(
                    f"labels of {chunk.samples} have {labels.dtype} "
                    f"{tuple(labels.shape[1:])} per sample, the first batch had "
                    f"{self.labels.dtype} {tuple(self.labels.shape[1:])}."
                )
            self.labels[positions] = labels.to(self.labels.device)

    def _mask(self, inputs: Any) -> torch.Tensor:
        if not isinstance(inputs, dict) or self.s.mask_key not in inputs:
            raise FastFTValueError(
                f"pool='masked_mean' takes the mask from inputs[{self.s.mask_key!r}], but the "
                "inputs "
                + (
                    "have keys " + ", ".join(map(repr, inputs))
                    if isinstance(inputs, dict)
                    else "are not a dict"
                )
                + ". Pass mask_key= or another pool."
            )
        return inputs[self.s.mask_key]

    def _tap_mask(
        self, mask: torch.Tensor | None, src: torch.Tensor, name: str
    ) -> torch.Tensor | None:
        if mask is None or src.shape[1] == 1:
            return None  # one position: masked_mean is that position (no mask needed)
        if tuple(mask.shape) != tuple(src.shape[:2]):
            raise DataError(
                f"pool='masked_mean': tap {name!r} has {src.shape[1]} positions but the mask has "
                f"shape {tuple(mask.shape)}; it must be [B, L] for the tap's [B, L, D]."
            )
        return mask.to(src.device)

    def _tap_pool(self, mask: torch.Tensor | None, src: torch.Tensor) -> str:
        if self.s.pool == "masked_mean" and mask is None:
            return "first" if src.shape[1] == 1 else "mean"
        return self.s.pool


class LayoutMismatch(CacheCorruptError):
    """A resumed build's manifest does not describe what the prefix produces: rebuilt from
    scratch."""
