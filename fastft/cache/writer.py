"""Running the frozen prefix on chunks of data and writing its activations into storage.

:class:`Writer` does one chunk: load, transform (seeded per chunk), run the prefix, check,
``cache_write`` every tap into its rows, store the labels. :func:`run_chunks` drives a
writer over the chunks a build still needs, whatever the tier.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastft import data as fdata
from fastft.cache.fingerprint import accepts_generator
from fastft.cache.layout import TapInfo, TapStorage, dtype_str, row_bytes, str_dtype
from fastft.cache.staging import staged
from fastft.data.sources import Chunk, Source
from fastft.errors import CacheCorruptError, DataError, FastFTError, FastFTValueError


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
    progress: bool
    seed: int
    device: torch.device
    amp: str | None = None
    transform_id: str | None = None


@dataclass
class Timer:
    """What a build spent: seconds in the prefix and in writes, prefix calls, rows written."""

    prefix: float = 0.0
    write: float = 0.0
    prefix_calls: int = 0
    rows_written: int = 0


@dataclass
class Probe:
    """One chunk run through the prefix ahead of the build (its activations tell the taps'
    widths, hence the size and the tier); the build writes it as its first chunk."""

    chunk: Chunk
    names: list[str]
    tensors: list[torch.Tensor]
    inputs: Any
    labels: torch.Tensor


# ---------------------------------------------------------------------------- activations
def as_bld(x: torch.Tensor, pool: str) -> torch.Tensor:
    """An activation seen as ``[B, L, D]`` for cache_write (a view wherever possible).

    ``pool='none'`` keeps the whole activation as one position (D = its size per sample);
    otherwise ``[B, D]`` is one position, ``[B, L, D]`` stays, and channel-first maps
    ``[B, C, H, W, ...]`` become ``[B, H*W*..., C]`` positions of C channels.
    """
    if pool == "none" or x.dim() == 2:
        return x.reshape(x.shape[0], 1, -1)
    if x.dim() == 3:
        return x
    if x.dim() >= 4:
        return x.flatten(2).transpose(1, 2)
    raise DataError(
        f"a frozen activation of shape {tuple(x.shape)} has no per-sample features to cache."
    )


def tap_shape(x: torch.Tensor, pool: str) -> tuple[int, ...]:
    return tuple(x.shape[1:]) if pool == "none" else (int(as_bld(x, pool).shape[2]),)


def taps_of(out: Any, prefix: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the prefix's output (a tensor, a tuple/list, or a dict)."""
    if isinstance(out, torch.Tensor):
        tensors = [out]
    elif isinstance(out, dict):
        return [str(k) for k in out], list(out.values())
    elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out) and out:
        tensors = list(out)
    else:
        raise DataError(
            f"the frozen prefix must return a tensor or a tuple of tensors, got {type(out).__name__}."
        )
    names = (
        prefix.tap_names if getattr(type(prefix), "_fastft_prefix", False) else None
    )  # a split's own names
    if not names or len(names) != len(tensors):
        names = [f"tap{i}" for i in range(len(tensors))]
    return [str(n) for n in names], tensors


def check_finite(
    store: TapStorage, rows: slice, name: str, start: int, view: int, views: int
) -> None:
    """Raise DataError when a just-written row is NaN or Inf.

    The check reads the stored rows (D values per sample, not L x D), so it costs little and
    covers exactly what training will read: NaN/Inf from the prefix (pooling propagates them)
    and values that overflow the storage dtype (fp16 beyond 65504). An int8 row's scale is
    non-finite exactly when its row was.
    """
    written = store.scales[rows] if store.data.dtype == torch.int8 else store.data[rows]
    finite = torch.isfinite(written.reshape(written.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        where = f" (view {view})" if views > 1 else ""
        raise DataError(
            f"the frozen features of sample {start + bad}{where} are NaN or Inf in tap {name!r} (or too "
            f"large for the {dtype_str(store.data.dtype)} storage dtype); check that sample's input "
            "and the pretrained weights, or store in bf16/fp32. The cache was not completed."
        )


def check_exact(x: torch.Tensor, name: str, start: int) -> None:
    """A non-float tap is stored in fp32, which holds integers exactly only up to 2**24."""
    if x.dtype == torch.bool or x.numel() == 0:
        return
    if int(x.abs().max()) > 2**24:
        raise DataError(
            f"tap {name!r} (dtype {x.dtype}) of samples {start}.. holds integers beyond 2**24, which "
            "the cache cannot store exactly; move the cut so that this tensor is computed in the tail."
        )


# ---------------------------------------------------------------------------- chunks of data
def chunks(source: Source, s: Settings, skip: Callable[[int, int, int], bool]) -> Iterator[Chunk]:
    """Every (view, batch of samples) still to compute, in order, with a loader of its data
    (see :meth:`fastft.data.sources.Source.chunks`)."""
    return source.chunks(s.views, s.batch_size, skip, s.num_workers)


def first_chunk(source: Source, s: Settings) -> Chunk:
    return next(chunks(source, s, lambda v, st, c: (v, st) != (0, 0)))


def describe_inputs(inputs: Any) -> str:
    """``inputs`` in a few words: shape, dtype and device of a tensor or of each tensor of a dict."""

    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{list(t.shape)} {dtype_str(t.dtype)} on {t.device}"
        return type(t).__name__

    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    return one(inputs)


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
                out = self._call("the frozen prefix", lambda: self.prefix(inputs), chunk, inputs)
            names, tensors = taps_of(out, self.prefix)
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)
        self.timer.prefix += time.perf_counter() - t0
        self.timer.prefix_calls += 1
        return names, tensors, inputs, labels

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
                f"{what} failed on samples {chunk.start}..{chunk.start + chunk.count - 1}{view} with inputs "
                f"{describe_inputs(inputs)}: {type(exc).__name__}: {exc}. Check that the data have the shape, "
                "dtype and device the model takes."
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
            torch.cuda.synchronize(self.s.device)
        self.timer.write += time.perf_counter() - t0
        self.timer.rows_written += chunk.count

    def _write(self, chunk: Chunk, tensors, inputs, labels) -> None:
        if len(tensors) != len(self.taps):
            raise DataError(
                f"the prefix returned {len(tensors)} taps for samples {chunk.start}.. but {len(self.taps)} before."
            )
        if int(labels.shape[0]) != chunk.count:
            raise DataError(
                f"a batch of {chunk.count} samples came with {int(labels.shape[0])} labels."
            )
        mask = self._mask(inputs) if self.s.pool == "masked_mean" else None
        for tap, x, store in zip(self.taps, tensors, self.storages):
            pool = tap.pool  # the cache's pool, or 'none' for non-float and one-number taps
            if tap.source_dtype is not None:
                check_exact(x, tap.name, chunk.start)
            if x.shape[0] != chunk.count or tap_shape(x, pool) != tap.shape:
                raise DataError(
                    f"tap {tap.name!r} has shape {tuple(x.shape)} for samples {chunk.start}..; expected "
                    f"[{chunk.count}, ...] giving per-sample {tap.shape} as in the first batch."
                )
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                x = x.float()  # float64 or integer activations: the kernels take fp32/bf16/fp16
            src = as_bld(x, pool)
            tap_mask = None if pool == "none" else self._tap_mask(mask, src, tap.name)
            dst = store.data
            if dst.device != src.device and not (dst.is_pinned() and src.is_cuda):
                src = src.to(dst.device)
                tap_mask = None if tap_mask is None else tap_mask.to(dst.device)
            first = chunk.view * self.n + chunk.start
            rows = torch.arange(first, first + chunk.count, device=src.device)
            tap_pool = "none" if pool == "none" else self._tap_pool(tap_mask, src)
            torch.ops.fastft.cache_write(src, rows, dst, store.scales, tap_pool, tap_mask)
            if src.is_cuda and dst.device.type == "cpu":
                # The kernel writes the pinned rows through mapped memory: read them only once it
                # has run (the row check may be deferred, and then nothing else waits for it).
                torch.cuda.current_stream(src.device).synchronize()
            check_finite(
                store,
                slice(first, first + chunk.count),
                tap.name,
                chunk.start,
                chunk.view,
                self.s.views,
            )
        if chunk.view == 0:
            if (
                list(labels.shape[1:]) != list(self.labels.shape[1:])
                or labels.dtype != self.labels.dtype
            ):
                raise DataError(
                    f"labels of samples {chunk.start}.. have {labels.dtype} {tuple(labels.shape[1:])} per sample, "
                    f"the first batch had {self.labels.dtype} {tuple(self.labels.shape[1:])}."
                )
            self.labels[chunk.start : chunk.start + chunk.count] = labels.to(self.labels.device)

    def _mask(self, inputs: Any) -> torch.Tensor:
        if not isinstance(inputs, dict) or self.s.mask_key not in inputs:
            raise FastFTValueError(
                f"pool='masked_mean' takes the mask from inputs[{self.s.mask_key!r}], but the inputs "
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
                f"pool='masked_mean': tap {name!r} has {src.shape[1]} positions but the mask has shape "
                f"{tuple(mask.shape)}; it must be [B, L] for the tap's [B, L, D]."
            )
        return mask.to(src.device)

    def _tap_pool(self, mask: torch.Tensor | None, src: torch.Tensor) -> str:
        if self.s.pool == "masked_mean" and mask is None:
            return "first" if src.shape[1] == 1 else "mean"
        return self.s.pool


class LayoutMismatch(CacheCorruptError):
    """A resumed build's manifest does not describe what the prefix produces: rebuilt from scratch."""


# ---------------------------------------------------------------------------- running
def progress_bar(s: Settings, total: int, done: int):
    from tqdm.auto import tqdm

    enabled = s.progress and sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=done,
        unit="rows",
        unit_scale=True,
        desc="fastft cache",
        disable=not enabled,
        dynamic_ncols=True,
    )


def run_chunks(
    writer: Writer,
    source: Source,
    probe: Probe | None,
    skip: Callable[[int, int, int], bool],
    on_done: Callable[[Chunk], None],
    done: int,
    *,
    share: bool = False,
) -> int:
    """Forward and write every chunk not skipped; ``on_done`` after each written chunk.
    Returns the number of rows written. ``share``: the chunks are one rank's share of a
    sharded build (its progress bar counts rows, with no total)."""
    s, n = writer.s, writer.n
    bar = progress_bar(s, None if share else n * s.views, done)
    written = 0
    try:
        for chunk in staged(chunks(source, s, skip), s.device):
            if (
                probe is not None
                and (chunk.view, chunk.start) == (0, 0)
                and chunk.count == probe.chunk.count
            ):
                names, tensors, inputs, labels = (
                    probe.names,
                    probe.tensors,
                    probe.inputs,
                    probe.labels,
                )
            else:
                names, tensors, inputs, labels = writer.forward(chunk)
            probe = None
            writer.write(chunk, names, tensors, inputs, labels)
            on_done(chunk)
            bar.update(chunk.count)
            written += chunk.count
    finally:
        bar.close()
    source.check_unchanged()
    return written


def _telemetry(
    timer: Timer, tier: str, nbytes: int, t_start: float, reason: str, n: int, views: int, **extra
) -> dict:
    return {
        "rows": n * views,
        "bytes": {tier: nbytes},
        "build_seconds": time.perf_counter() - t_start,
        "prefix_seconds": timer.prefix,
        "write_seconds": timer.write,
        "hit": False,
        "reason": reason,
        "prefix_calls": timer.prefix_calls,
        "rows_computed": timer.rows_written,
        **extra,
    }


def telemetry(
    timer: Timer, tier: str, nbytes: int, t_start: float, reason: str, rows: int, **extra
) -> dict:
    """What a build reports in ``cache.telemetry`` (a build that computed rows)."""
    return {
        "rows": rows,
        "bytes": {tier: nbytes},
        "build_seconds": time.perf_counter() - t_start,
        "prefix_seconds": timer.prefix,
        "write_seconds": timer.write,
        "hit": False,
        "reason": reason,
        "prefix_calls": timer.prefix_calls,
        "rows_computed": timer.rows_written,
        **extra,
    }


def hit_telemetry(
    t_start: float, reason: str, prefix_seconds: float = 0.0, prefix_calls: int = 0
) -> dict:
    """What a reuse reports (nothing written; a probe may have run the prefix once)."""
    return {
        "hit": True,
        "reason": reason,
        "build_seconds": time.perf_counter() - t_start,
        "prefix_seconds": prefix_seconds,
        "write_seconds": 0.0,
        "prefix_calls": prefix_calls,
        "rows_computed": 0,
    }


# ---------------------------------------------------------------------------- a build's job
@dataclass
class Job:
    """One build of one key: the writer (prefix, settings, timer), the data, the key and why
    it is built."""

    writer: Writer
    source: Source
    fp: str
    parts: dict
    reason: str
    t_start: float

    @property
    def s(self) -> Settings:
        return self.writer.s

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def folder(self) -> Path:
        return self.writer.s.root / self.fp

    def telemetry(self, tier: str, nbytes: int, **extra) -> dict:
        """This build's telemetry (see :func:`telemetry`)."""
        return telemetry(
            self.writer.timer,
            tier,
            nbytes,
            self.t_start,
            self.reason,
            self.n * self.s.views,
            **extra,
        )
