"""Building a feature cache: run the frozen prefix once per sample and view, write each batch
of frontier activations into the cache with ``cache_write``.

The steps of :func:`build`:

1. Key: the fingerprint of prefix, data, transform, views, dtype and pool.
2. Reuse: a cache with that key in this process (any tier), or complete on disk, is
   returned without running the prefix.
3. Layout: the first chunk's activations give each tap's width and shape; the tier is
   chosen from the total size; storage is allocated (memory, or memory-mapped files).
4. Chunks: per view, per batch of samples: load, transform (seeded per chunk), run the
   prefix, check for NaN/Inf, ``cache_write`` every tap into its rows, store the labels.
   Disk chunks are committed to the journal after an fsync; committed chunks are skipped
   when an interrupted build resumes, and a builder of the same key on disk holds its lock.

Inside a torch.distributed process group, a disk cache is built by every rank together,
each rank computing its share of the chunks (:func:`build_sharded`); the memory tiers and
``auto`` are built by each rank for itself.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import random
import socket
import sys
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from fastft import data as fdata
from fastft import distributed as fdist
from fastft.cache import disk
from fastft.cache.feature_cache import FeatureCache, TapInfo
from fastft.cache.fingerprint import (FORMAT_VERSION, PARTS, CacheKey, accepts_generator, changed_parts, combine,
                                      describe_changes, make_key, warn_if_self_changing, warn_if_transform_changed,
                                      warn_not_reusable)
from fastft.data.sources import Chunk, Source, as_source
from fastft.cache.manage import cache_root
from fastft.cache.staging import staged
from fastft.cache.storage import DTYPES, TIERS, TapStorage, allocate, choose_tier, dtype_name, memory_device, parse_bytes, row_bytes
from fastft.errors import CacheCorruptError, CacheError, DataError, FastFTError, FastFTValueError
from fastft.ops import POOLS

log = logging.getLogger("fastft.cache")

#: A disk build commits its finished chunks (fsync + journal rename) at most this often, and
#: always at the end or when interrupted by an exception; a killed process loses at most this
#: much work. Per-chunk commits would pay an fsync per batch.
COMMIT_INTERVAL_S = 1.0

# ---------------------------------------------------------------------------- process registry
# Caches built in this process, by fingerprint: a few are kept alive (in-memory tiers cannot
# be found again otherwise), any other one is found while the caller still holds it.
_REGISTRY_SIZE = 4
_recent: "OrderedDict[str, FeatureCache]" = OrderedDict()
_alive: "weakref.WeakValueDictionary[str, FeatureCache]" = weakref.WeakValueDictionary()
_history: deque = deque(maxlen=64)  # (fingerprint, parts) of recent keys, to explain rebuilds


def _register(cache: FeatureCache) -> None:
    _alive[cache.fingerprint] = cache
    _recent[cache.fingerprint] = cache
    _recent.move_to_end(cache.fingerprint)
    while len(_recent) > _REGISTRY_SIZE:
        _recent.popitem(last=False)
    _history.append((cache.fingerprint, cache.parts))


def _registered(fp: str) -> FeatureCache | None:
    found = _recent.get(fp) or _alive.get(fp)
    if found is not None and found.path is not None and not (Path(found.path) / disk.MANIFEST).is_file():
        # The disk cache was removed (fastft cache rm) since: forget it, never read a ghost.
        _recent.pop(fp, None)
        _alive.pop(fp, None)
        return None
    return found


def forget(fp: str) -> None:
    """Forget the cache ``fp`` of this process (it is rebuilt, or reopened from disk)."""
    _recent.pop(fp, None)
    _alive.pop(fp, None)


def clear_registry() -> None:
    """Forget the caches of this process (they are rebuilt, or reopened from disk, next time)."""
    _recent.clear()
    _alive.clear()


def _explain(parts: dict, root: Path) -> str:
    """Why a key is new: the parts that differ from the nearest cache seen before (in this
    process or on disk), e.g. ``'rebuilt: weights changed'``."""
    candidates = list(_history)
    if root.is_dir():
        for folder in root.iterdir():
            try:
                manifest = disk.read_manifest(folder)
                candidates.append((manifest["fingerprint"], manifest["parts"]))
            except (OSError, CacheError):
                continue
    best = None
    for _, old in candidates:
        changed = changed_parts(old, parts)
        if not changed:
            return "new in this tier: the same key was cached in another tier"
        if changed and (best is None or len(changed) <= len(best)):
            best = changed
    if best is None or len(best) == len(PARTS):
        return "new: no cache with this key"
    return f"rebuilt: {describe_changes(best)} changed"


# ---------------------------------------------------------------------------- settings
@dataclass
class Settings:
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
    prefix: float = 0.0
    write: float = 0.0
    prefix_calls: int = 0
    rows_written: int = 0


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
    raise DataError(f"a frozen activation of shape {tuple(x.shape)} has no per-sample features to cache.")


def tap_shape(x: torch.Tensor, pool: str) -> tuple[int, ...]:
    return tuple(x.shape[1:]) if pool == "none" else (int(as_bld(x, pool).shape[2]),)


def _taps(out: Any, prefix: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the prefix's output (a tensor, a tuple/list, or a dict)."""
    if isinstance(out, torch.Tensor):
        tensors = [out]
    elif isinstance(out, dict):
        return [str(k) for k in out], list(out.values())
    elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out) and out:
        tensors = list(out)
    else:
        raise DataError(f"the frozen prefix must return a tensor or a tuple of tensors, got {type(out).__name__}.")
    names = prefix.tap_names if getattr(type(prefix), "_fastft_prefix", False) else None  # a split's own names
    if not names or len(names) != len(tensors):
        names = [f"tap{i}" for i in range(len(tensors))]
    return [str(n) for n in names], tensors


def _check_finite(store: TapStorage, rows: slice, name: str, start: int, view: int, views: int) -> None:
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
            f"large for the {disk.dtype_to_str(store.data.dtype)} storage dtype); check that sample's input "
            "and the pretrained weights, or store in bf16/fp32. The cache was not completed."
        )


def _check_exact(x: torch.Tensor, name: str, start: int) -> None:
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


def _first_chunk(source: Source, s: Settings) -> Chunk:
    return next(chunks(source, s, lambda v, st, c: (v, st) != (0, 0)))


def describe_inputs(inputs: Any) -> str:
    """``inputs`` in a few words: shape, dtype and device of a tensor or of each tensor of a dict."""
    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{list(t.shape)} {disk.dtype_to_str(t.dtype)} on {t.device}"
        return type(t).__name__
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    return one(inputs)


def _chunk_seed(seed: int, view: int, start: int) -> int:
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
        #: resume must produce exactly this layout, else the manifest lied (see _LayoutMismatch).
        self.expected_layout: tuple[list[TapInfo], dict] | None = None

    def forward(self, chunk: Chunk) -> tuple[list[str], list[torch.Tensor], Any, torch.Tensor]:
        """(tap names, tap activations, inputs, labels) of one chunk: one prefix call."""
        inputs, labels = chunk.load()
        inputs = fdata.to_device(inputs, self.s.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.s.transform is not None:
                inputs = self._call("the transform", lambda: self._transform(inputs, chunk), chunk, inputs)
            with torch.autocast(self.s.device.type, dtype=torch.bfloat16, enabled=self.s.amp == "bf16"):
                out = self._call("the frozen prefix", lambda: self.prefix(inputs), chunk, inputs)
            names, tensors = _taps(out, self.prefix)
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
        seed = _chunk_seed(self.s.seed, chunk.view, chunk.start)
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

    def layout(self, names: list[str], tensors: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[TapInfo], dict]:
        """Taps and label layout from the first chunk's activations."""
        taps = []
        for name, x in zip(names, tensors):
            if x.dim() < 1:
                raise DataError(f"tap {name!r} has shape {tuple(x.shape)}; a frozen activation needs [B, ...].")
            if x.dim() == 1:  # one number per sample (a length, a score): a row of one, never pooled
                dtype, source = (self.s.storage_dtype, None) if x.is_floating_point() else (torch.float32, x.dtype)
                taps.append(TapInfo(name, 1, (), dtype, "none", source))
            elif x.is_floating_point():
                shape = tap_shape(x, self.s.pool)
                taps.append(TapInfo(name, int(torch.Size(shape).numel()), shape, self.s.storage_dtype, self.s.pool))
            else:  # masks, token ids: kept whole and exact (fp32 holds integers up to 2**24)
                shape = tuple(x.shape[1:])
                taps.append(TapInfo(name, int(torch.Size(shape).numel()), shape, torch.float32, "none", x.dtype))
        label_layout = {"dtype": disk.dtype_to_str(labels.dtype), "shape": list(labels.shape[1:])}
        return taps, label_layout

    def total_bytes(self, taps: list[TapInfo], labels: dict) -> int:
        label_row = torch.Size(labels["shape"]).numel() * torch.empty((), dtype=disk.str_to_dtype(labels["dtype"])).element_size()
        return self.n * (self.s.views * sum(row_bytes(t.dim, t.dtype) for t in taps) + label_row)

    def write(self, chunk: Chunk, names, tensors, inputs, labels) -> None:
        """Check and write one chunk's activations and labels into the storage."""
        if self.expected_layout is not None:
            taps, label_layout = self.layout(names, tensors, labels)
            expected_taps, expected_labels = self.expected_layout
            if taps != expected_taps or label_layout != {k: expected_labels.get(k) for k in label_layout}:
                raise _LayoutMismatch(
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
            raise DataError(f"the prefix returned {len(tensors)} taps for samples {chunk.start}.. but {len(self.taps)} before.")
        if int(labels.shape[0]) != chunk.count:
            raise DataError(f"a batch of {chunk.count} samples came with {int(labels.shape[0])} labels.")
        mask = self._mask(inputs) if self.s.pool == "masked_mean" else None
        for tap, x, store in zip(self.taps, tensors, self.storages):
            pool = tap.pool  # the cache's pool, or 'none' for non-float and one-number taps
            if tap.source_dtype is not None:
                _check_exact(x, tap.name, chunk.start)
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
            _check_finite(store, slice(first, first + chunk.count), tap.name, chunk.start, chunk.view, self.s.views)
        if chunk.view == 0:
            if list(labels.shape[1:]) != list(self.labels.shape[1:]) or labels.dtype != self.labels.dtype:
                raise DataError(
                    f"labels of samples {chunk.start}.. have {labels.dtype} {tuple(labels.shape[1:])} per sample, "
                    f"the first batch had {self.labels.dtype} {tuple(self.labels.shape[1:])}."
                )
            self.labels[chunk.start:chunk.start + chunk.count] = labels.to(self.labels.device)

    def _mask(self, inputs: Any) -> torch.Tensor:
        if not isinstance(inputs, dict) or self.s.mask_key not in inputs:
            raise FastFTValueError(
                f"pool='masked_mean' takes the mask from inputs[{self.s.mask_key!r}], but the inputs "
                + ("have keys " + ", ".join(map(repr, inputs)) if isinstance(inputs, dict) else "are not a dict")
                + ". Pass mask_key= or another pool."
            )
        return inputs[self.s.mask_key]

    def _tap_mask(self, mask: torch.Tensor | None, src: torch.Tensor, name: str) -> torch.Tensor | None:
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


class _LayoutMismatch(CacheCorruptError):
    """A resumed build's manifest does not describe what the prefix produces: rebuilt from scratch."""


# ---------------------------------------------------------------------------- the build
def check_views(views: int, transform: Callable | None) -> None:
    """FastFTValueError unless ``views`` is a count of views that ``transform`` can make."""
    if int(views) < 1:
        raise FastFTValueError(f"views must be ≥ 1, got {views}.")
    if views > 1 and transform is None:
        raise FastFTValueError("views > 1 caches augmented views: pass the random transform= that makes them.")


def check_amp(amp: str | None, name: str = "amp") -> None:
    """FastFTValueError unless ``amp`` is None or 'bf16' (``name``: the argument, in the message)."""
    if amp not in (None, "bf16"):
        raise FastFTValueError(f"{name} must be None or 'bf16' (the frozen pass under bf16 autocast), got {amp!r}.")


def _settings(dtype, tier, views, transform, pool, mask_key, batch_size, num_workers, cache_dir,
              max_memory, progress, seed, device, prefix, amp=None) -> Settings:
    name = dtype_name(dtype)
    check_amp(amp)
    if tier not in TIERS:
        raise FastFTValueError(f"unknown cache tier {tier!r}; use one of {', '.join(TIERS)}.")
    if pool not in POOLS:
        raise FastFTValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}.")
    check_views(views, transform)
    if int(batch_size) < 1:
        raise FastFTValueError(f"batch_size must be >= 1, got {batch_size}.")
    if device is None:
        first = next(iter(prefix.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    return Settings(name, DTYPES[name], tier, int(views), transform, pool, mask_key, int(batch_size),
                    int(num_workers), cache_root(cache_dir), parse_bytes(max_memory), progress, int(seed),
                    torch.device(device), amp)


def _progress_bar(s: Settings, total: int, done: int):
    from tqdm.auto import tqdm

    enabled = s.progress and sys.stderr.isatty()
    return tqdm(total=total, initial=done, unit="rows", unit_scale=True, desc="fastft cache",
                disable=not enabled, dynamic_ncols=True)


def build(cls, prefix: nn.Module, dataset: Any, *, dtype, tier, views, transform, pool, mask_key,
          batch_size, num_workers, cache_dir, dataset_id, max_memory, progress, seed, device,
          amp=None, transform_id=None) -> FeatureCache:
    """See :meth:`FeatureCache.build`."""
    t_start = time.perf_counter()
    s = _settings(dtype, tier, views, transform, pool, mask_key, batch_size, num_workers, cache_dir,
                  max_memory, progress, seed, device, prefix, amp)
    source = as_source(dataset)
    n = source.n
    key = make_key(prefix, source, dataset_id=dataset_id, transform=transform, transform_id=transform_id,
                   views=s.views, seed=s.seed, batch_size=s.batch_size, num_workers=s.num_workers, dtype=s.dtype,
                   pool=s.pool, mask_key=mask_key, amp=s.amp, device=s.device)
    source.check_unchanged()  # before anything is made: a dataset whose len() drifts is refused
    fp, parts = key.fingerprint, key.parts
    if not key.reusable:
        warn_not_reusable(key)

    def hit(cache: FeatureCache, reason: str = "hit") -> FeatureCache:
        _register(cache)
        return cache.with_telemetry(hit=True, reason=reason, build_seconds=time.perf_counter() - t_start,
                                    prefix_seconds=0.0, write_seconds=0.0, prefix_calls=0,
                                    rows_computed=0)

    reason = None
    known = _registered(fp) if key.reusable else None
    if known is not None and s.tier in ("auto", known.tier):
        try:
            _check_labels(known, key, dataset_id)
        except CacheCorruptError:  # its labels were changed in place since: built again
            forget(fp)
            known = None
    if known is not None and s.tier in ("auto", known.tier):
        if known.tier == "disk" or _placed_for(known, s.device):
            return hit(known)
        # Built in this process for another device (a CPU run, then a CUDA one): the same
        # bytes, copied where this device reads them best, not rebuilt and not read remotely.
        return hit(_to_memory(cls, known, replace(s, tier=known.tier)), "hit: copied for this device")
    folder = s.root / fp
    if key.reusable and (folder / disk.MANIFEST).is_file():
        try:
            found = cls.from_folder(folder, expected=fp)
            _check_labels(found, key, dataset_id)
            if s.tier in ("auto", "disk"):
                return hit(found)
            return hit(_to_memory(cls, found, s), "hit: loaded from disk")
        except CacheCorruptError as exc:
            reason = f"rebuilt: the cache on disk was corrupt ({exc})"
        except CacheError:
            pass  # an interrupted build: resumed below
    reason = reason or (_explain(parts, s.root) if key.reusable else "built for this use only (key not reusable)")

    prefix_mode = prefix.training
    _eval(prefix)  # the frozen part always runs in eval mode (BatchNorm running stats, no dropout)
    try:
        if s.tier == "disk" and fdist.is_distributed():
            cache = build_sharded(cls, prefix, source, n, s, fp, parts, reason, t_start)
        else:
            cache = _run(cls, prefix, source, n, s, fp, parts, reason, t_start)
    finally:
        _eval(prefix, prefix_mode)
    if not key.reusable and cache.path is not None:
        _forget_at_exit(cache.path)
    if key.reusable and not cache.telemetry.get("hit"):
        warn_if_self_changing(prefix, key)
        warn_if_transform_changed(transform, key)
    return cache


def _eval(prefix: nn.Module, mode: bool = False) -> None:
    """``prefix.train(mode)``; a module that has no modes (torch.export's, which refuses
    train() and eval()) is left as it is: it computes in the mode it was exported in."""
    try:
        prefix.train(mode)
    except NotImplementedError:
        pass


def _check_labels(cache: FeatureCache, key: CacheKey, dataset_id: str | None) -> None:
    """A reused cache must hold the labels of the data it is reused for (when they are known
    without another pass over the data): else CacheCorruptError (rebuilt) or, when the data
    were named by ``dataset_id``, a CacheError saying the id names other data."""
    if key.labels is None:
        return
    mine = key.labels.to(cache.labels.device)
    if mine.shape == cache.labels.shape and mine.dtype == cache.labels.dtype and torch.equal(mine, cache.labels):
        return
    if dataset_id is not None:
        raise CacheError(
            f"dataset_id={dataset_id!r} names a cache whose labels differ from the labels of the data passed now: "
            "the id names other data. Pass a new dataset_id for these data (or none: fastft then hashes them)."
        )
    raise CacheCorruptError(f"cache {cache.fingerprint[:12]} holds other labels than its key says")


_FORGET: list[Path] = []


def _forget_at_exit(folder: Path) -> None:
    """Remove a disk cache that can never be reused when this process ends."""
    if not _FORGET:
        atexit.register(lambda: [disk.remove_folder(f, missing_ok=True) for f in _FORGET])
    _FORGET.append(folder)


def _placed_for(cache: FeatureCache, device: torch.device) -> bool:
    """Whether an in-memory cache lives where its tier puts it for ``device`` (pinned or not)."""
    where, pin = memory_device(cache.tier, device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    data = cache._storages[0].data
    return data.device == where and (where.type != "cpu" or data.is_pinned() == pin)


def _to_memory(cls, found: FeatureCache, s: Settings) -> FeatureCache:
    """A complete cache (on disk, or in memory elsewhere) copied into the requested in-memory tier."""
    if found._verifier is not None:
        found._verifier.check_all()  # every row is read below: every checksum first
    where, pin = memory_device(s.tier, s.device)
    storages = []
    for st in found._storages:
        data = st.data.to(where, copy=True)
        scales = st.scales.to(where, copy=True)
        storages.append(TapStorage(data.pin_memory() if pin else data, scales.pin_memory() if pin else scales))
    labels = found.labels.clone()
    return cls(fingerprint=found.fingerprint, parts=found.parts, tier=s.tier, taps=found.taps, storages=storages,
               labels=labels, num_rows=found.num_rows, num_views=found.num_views,
               telemetry=dict(found.telemetry, bytes={s.tier: found.nbytes}))


def _run(cls, prefix, source, n, s: Settings, fp, parts, reason, t_start) -> FeatureCache:
    timer = Timer()
    writer = Writer(prefix, s, n, timer)
    folder = s.root / fp
    resuming = (folder / disk.MANIFEST).is_file()
    tier = "disk" if resuming and s.tier == "auto" else s.tier  # an interrupted disk build resumes
    probe, writer_layout = None, None
    if tier in ("host", "device") or (tier == "auto" and not resuming):
        # The first chunk's activations tell the taps' widths, hence the size and the tier.
        first = _first_chunk(source, s)
        probe = (first, *writer.forward(first))
        writer_layout = writer.layout(probe[1], probe[2], probe[4])
        tier = choose_tier(tier, writer.total_bytes(*writer_layout), s.device, s.max_memory, s.storage_dtype)
    if tier != "disk":
        return _build_in_memory(cls, writer, source, n, s, fp, parts, reason, t_start, tier, probe, writer_layout)
    with disk.build_lock(s.root, fp, on_wait=lambda: log.warning(
            "fastft: another process is building cache %s; waiting for it to finish.", fp[:12])):
        cache = _complete_cache(cls, folder)
        if cache is not None:
            _register(cache)
            return cache.with_telemetry(hit=True, reason="hit: built by another process",
                                        build_seconds=time.perf_counter() - t_start,
                                        prefix_seconds=timer.prefix, write_seconds=0.0,
                                        prefix_calls=timer.prefix_calls, rows_computed=0)
        return _build_on_disk(cls, writer, source, n, s, fp, parts, reason, t_start, probe)


def _run_chunks(writer: Writer, source, n, s: Settings, probe, skip, on_done: Callable[[Chunk], None], done: int,
                *, share: bool = False) -> int:
    """Forward and write every chunk not skipped; ``on_done`` after each written chunk.
    Returns the number of rows written. ``share``: the chunks are one rank's share of a
    sharded build (its progress bar counts rows, with no total)."""
    bar = _progress_bar(s, None if share else n * s.views, done)
    written = 0
    try:
        for chunk in staged(chunks(source, s, skip), s.device):
            if probe is not None and (chunk.view, chunk.start) == (0, 0) and chunk.count == probe[0].count:
                _, names, tensors, inputs, labels = probe
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


def _telemetry(timer: Timer, tier: str, nbytes: int, t_start: float, reason: str, n: int, views: int, **extra) -> dict:
    return {"rows": n * views, "bytes": {tier: nbytes}, "build_seconds": time.perf_counter() - t_start,
            "prefix_seconds": timer.prefix, "write_seconds": timer.write, "hit": False, "reason": reason,
            "prefix_calls": timer.prefix_calls, "rows_computed": timer.rows_written, **extra}


def _build_in_memory(cls, writer: Writer, source, n, s, fp, parts, reason, t_start, tier, probe, layout) -> FeatureCache:
    taps, label_layout = layout
    where, pin = memory_device(tier, s.device)
    writer.taps = taps
    writer.storages = [allocate(n * s.views, t.dim, t.dtype, where, pin) for t in taps]
    writer.labels = torch.zeros((n, *label_layout["shape"]), dtype=disk.str_to_dtype(label_layout["dtype"]))
    written = _run_chunks(writer, source, n, s, probe, lambda v, st, c: False, lambda chunk: None, 0)
    if written != n * s.views:
        raise CacheError(f"the data yielded {written // s.views} samples per view but its length is {n}; "
                         "the cache was not completed.")
    nbytes = sum(st.nbytes for st in writer.storages) + writer.labels.numel() * writer.labels.element_size()
    cache = cls(fingerprint=fp, parts=parts, tier=tier, taps=taps, storages=writer.storages, labels=writer.labels,
                num_rows=n, num_views=s.views,
                telemetry=_telemetry(writer.timer, tier, nbytes, t_start, reason, n, s.views))
    _register(cache)
    return cache


def _complete_cache(cls, folder: Path) -> FeatureCache | None:
    """The cache in ``folder`` when another process completed it (checked under the build
    lock); None when there is none, or it is incomplete, unreadable or corrupt (rebuilt)."""
    if not (folder / disk.MANIFEST).is_file():
        return None
    try:
        if disk.read_manifest(folder).get("status") == "complete":
            return cls.from_folder(folder)
    except CacheError:  # unreadable or corrupt (CacheCorruptError is a CacheError)
        pass
    return None


def _create_folder(writer: Writer, source, n, s: Settings, folder: Path, fp, parts, probe) -> tuple[dict, tuple]:
    """A new cache folder (manifest and preallocated files) laid out from the first chunk's
    activations (``probe``, computed here when None); returns (manifest, probe)."""
    if probe is None:
        first = _first_chunk(source, s)
        probe = (first, *writer.forward(first))
    taps, label_layout = writer.layout(probe[1], probe[2], probe[4])
    disk.check_free_space(folder, writer.total_bytes(taps, label_layout))
    try:
        with disk.write_errors(folder, f"creating its files ({writer.total_bytes(taps, label_layout)} bytes)"):
            return _new_folder(folder, fp, parts, taps, label_layout, n, s), probe
    except BaseException:
        disk.discard_folder(folder)  # nothing in a new folder is committed: free its space
        raise


def _attach(writer: Writer, folder: Path, manifest: dict, resumed: bool) -> tuple[list, dict]:
    """Map a cache folder's files writable and make them ``writer``'s storage; a resumed
    build's first chunk must then match the manifest's layout. Returns (layout, tensors)."""
    layout = disk.arrays(manifest)
    with disk.write_errors(folder, "opening its files"):
        tensors = {a.name: disk.map_array(folder, a) for a in layout}
    writer.taps = [TapInfo.from_json(t) for t in manifest["taps"]]
    empty = torch.empty(0, dtype=torch.float32)
    writer.storages = [TapStorage(tensors[t.name], tensors.get(t.name + ".scales", empty)) for t in writer.taps]
    writer.labels = tensors["labels"]
    writer.expected_layout = (writer.taps, manifest["labels"]) if resumed else None
    return layout, tensors


def _build_on_disk(cls, writer: Writer, source, n, s, fp, parts, reason, t_start, probe) -> FeatureCache:
    folder = s.root / fp
    manifest = _resumable_manifest(folder, fp, parts, n, s)
    resumed = manifest is not None
    if manifest is None:
        manifest, probe = _create_folder(writer, source, n, s, folder, fp, parts, probe)
    layout, tensors = _attach(writer, folder, manifest, resumed)
    journal = _read_journal(folder, n, s.views)  # with the rank journals of a sharded build, if any
    reused = _drop_bad_chunks(journal, tensors, layout, n)
    if disk.shard_journals(folder):  # one journal again, even when nothing is left to compute
        with disk.write_errors(folder, "merging the journals of its ranks", committed_rows=reused):
            journal.save()
    if reused:
        reason = f"resumed: {reused} of {n * s.views} rows were already committed"
    committer = _Committer(folder, layout, tensors, journal, n)
    commit = committer.commit

    try:
        _run_chunks(writer, source, n, s, probe, journal.is_committed, committer.done, reused)
    except _LayoutMismatch as exc:  # raised before any byte of this run was written
        log.warning("fastft: cache %s: %s; rebuilding it from scratch.", fp[:12], exc)
        del tensors, writer.storages, writer.labels
        writer.expected_layout = None
        disk.discard_folder(folder)
        return _build_on_disk(cls, writer, source, n, s, fp, parts, reason, t_start, None)
    except BaseException:
        try:
            commit()  # chunks fully written before an interruption are kept for the resume
        except Exception as exc:  # the interruption is the error to report; this one is logged
            log.warning("fastft: could not commit the finished chunks of cache %s: %s", fp[:12], exc)
        raise
    commit()
    if not journal.covers(n, s.views):
        raise CacheError(f"cache {fp}: the data yielded fewer samples than its length {n}; the build is incomplete.")
    nbytes = sum(a.nbytes for a in layout)
    telemetry = _telemetry(writer.timer, "disk", nbytes, t_start, reason, n, s.views, rows_reused=reused)
    manifest.update(status="complete", telemetry=telemetry)
    with disk.write_errors(folder, "marking it complete", committed_rows=journal.rows):
        disk.write_json_atomic(folder / disk.MANIFEST, manifest)
    # Let the writable mapping go before the read-only one is made (two mappings of the same
    # pages would count twice in this process's memory). Its checksums were computed here from
    # these bytes: the cache needs no second check in this process.
    del tensors, writer, committer
    cache = cls.from_folder(folder, telemetry=telemetry, verified=True)
    _register(cache)
    return cache


def _read_journal(folder: Path, n: int, views: int) -> disk.Journal:
    """The committed chunks of an interrupted build (every rank's, for a sharded one); none
    when the journal is unreadable (nothing it lists can be trusted: every chunk is recomputed)."""
    try:
        return disk.Journal(folder, n, views)
    except CacheCorruptError as exc:
        log.warning("fastft: %s; recomputing every chunk.", exc)
        disk.remove_journals(folder)
        return disk.Journal(folder)


class _Committer:
    """Commits finished chunks to ``journal``: fsync of the data files first (bytes durable
    before the journal names them), then the journal's atomic rewrite; at most every
    COMMIT_INTERVAL_S, and whenever :meth:`commit` is called."""

    def __init__(self, folder: Path, layout: list[disk.Array], tensors: dict, journal: disk.Journal, n: int):
        self.folder, self.layout, self.tensors, self.journal, self.n = folder, layout, tensors, journal, n
        self.pending: list[Chunk] = []
        self.last = time.monotonic()

    def done(self, chunk: Chunk) -> None:
        self.pending.append(chunk)
        if time.monotonic() - self.last >= COMMIT_INTERVAL_S:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        journal = self.journal
        with disk.write_errors(self.folder, "committing written rows", committed_rows=journal.rows):
            disk.fsync_files(self.folder, self.layout)
            saved = dict(journal.chunks)
            for c in self.pending:
                journal.add(c.view, c.start, c.count,
                            disk.chunk_checksums(self.tensors, self.layout, c.view, c.start, c.count, self.n))
            try:
                journal.save()
            except BaseException:
                journal.chunks = saved  # not durable: the journal in memory says what the file says
                raise
        self.pending.clear()
        self.last = time.monotonic()


def _resumable_manifest(folder: Path, fp: str, parts: dict, n: int, s: Settings) -> dict | None:
    """The manifest of an interrupted build of exactly this key and these settings whose files
    are intact in size, else None (and whatever is in the folder is removed)."""
    if not folder.exists():
        return None
    try:
        manifest = disk.read_manifest(folder)
        disk.check_sizes(folder, manifest)
        same = (manifest["fingerprint"] == fp and manifest["parts"] == parts and manifest["num_rows"] == n
                and manifest["num_views"] == s.views and manifest.get("dtype") == s.dtype
                and manifest.get("pool") == s.pool
                and all((t["dtype"] == disk.dtype_to_str(s.storage_dtype) and t["pool"] in (s.pool, "none"))
                        or "source_dtype" in t for t in manifest["taps"]))
        if manifest["status"] == "building" and same:
            return manifest
    except CacheError:
        pass
    disk.discard_folder(folder)
    return None


def _drop_bad_chunks(journal: disk.Journal, tensors, layout, n: int) -> int:
    """Verify the committed chunks of a resumed build; forget any whose bytes changed.
    Returns the number of rows kept."""
    bad = [(v, st) for (v, st), (c, sums) in journal.chunks.items()
           if disk.chunk_checksums(tensors, layout, v, st, c, n) != sums]
    for key in bad:
        journal.drop(*key)
    return journal.rows


def _new_folder(folder: Path, fp, parts, taps: list[TapInfo], label_layout: dict, n: int, s: Settings) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    disk.ensure_real_folder(folder)
    manifest = {
        "format_version": FORMAT_VERSION, "fingerprint": fp, "parts": parts, "status": "building",
        "created": time.time(), "num_rows": n, "num_views": s.views, "dtype": s.dtype, "pool": s.pool,
        "taps": [dict(t.to_json(), file=f"tap{i}.bin",
                      scales_file=f"tap{i}.scales.bin" if t.dtype == torch.int8 else None)
                 for i, t in enumerate(taps)],
        "labels": dict(label_layout, file="labels.bin"),
    }
    for array in disk.arrays(manifest):
        disk.map_array(folder, array, create=True)
    # Not fsynced: if this manifest is lost in a crash, the folder is simply rebuilt (no
    # journal entry can be durable before the first commit, which syncs the folder).
    disk.write_json_atomic(folder / disk.MANIFEST, manifest, durable=False)
    return manifest


# ---------------------------------------------------------------------------- sharded (torch.distributed)
#: Check every chunk's checksum before a sharded build is marked complete, and recompute on
#: rank 0 any chunk that fails. None (the default): only when the ranks run on more than one
#: host, where a network filesystem may write a memory-mapped page back whole and so
#: overwrite a neighbouring rank's rows with stale bytes.
VERIFY_SHARDS: bool | None = None


class _ShardSkip:
    """``skip`` of rank ``rank`` in a sharded build.

    :func:`chunks` asks about every chunk once, in the same order on every rank, and every
    rank is given the same set of committed chunks; of the chunks not committed yet, rank r
    computes the r-th, (r + world)-th, ... So the shares are disjoint, cover every missing
    chunk, and stay balanced when a resume finds one rank's old share already done.
    """

    def __init__(self, committed: set[tuple[int, int, int]], rank: int, world: int):
        self.committed, self.rank, self.world = committed, rank, world
        self.ordinal = 0

    def __call__(self, view: int, start: int, count: int) -> bool:
        if (view, start, count) in self.committed:
            return True
        mine = self.ordinal % self.world == self.rank
        self.ordinal += 1
        return not mine


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def build_sharded(cls, prefix: nn.Module, source: Source, n: int, s: Settings, fp: str, parts: dict, reason: str,
                  t_start: float) -> FeatureCache:
    """Build the disk cache ``fp`` with every rank of the torch.distributed process group.

    Every rank calls this (``FeatureCache.build`` with ``tier="disk"`` does, inside a process
    group of more than one rank) with the same model, data and settings:

    1. The ranks check that they build the same key.
    2. Rank 0, holding the cache's build lock (another job building the same key waits),
       creates the folder (manifest, preallocated files) or prepares the resume of an
       interrupted build: it verifies the chunks every rank committed and folds the rank
       journals into ``journal.json``. It sends every rank the set of committed chunks.
    3. Every rank maps the files writable and computes its share of the missing chunks
       (:class:`_ShardSkip`), committing them to its own journal ``journal.rank<r>.json``;
       the ranks write disjoint rows of the same files.
    4. When every rank is done, rank 0 merges the journals (after a checksum pass when
       :data:`VERIFY_SHARDS` says so, recomputing any chunk that fails) and marks the manifest
       complete; every rank then opens the complete cache.

    Chunks and their random transforms are those of a single-process build (seeds per
    chunk), so the files are byte for byte the same. A rank that dies loses only the chunks
    it had not committed: running the job again resumes from every rank's journal.

    The returned cache's telemetry counts what this rank did (``prefix_calls``,
    ``rows_computed``, seconds), with ``world_size`` and the per-rank lists
    ``prefix_calls_by_rank`` and ``rows_computed_by_rank``; the manifest's counts the whole build.
    """
    while True:
        cache = _build_sharded_once(cls, Writer(prefix, s, n, Timer()), source, n, s, fp, parts, reason, t_start)
        if cache is not None:
            return cache


def _build_sharded_once(cls, writer: Writer, source, n, s: Settings, fp, parts, reason, t_start) -> FeatureCache | None:
    """One attempt of :func:`build_sharded`; None when the interrupted build found on disk
    did not match the prefix (rank 0 removed it: build again from scratch)."""
    rank, world = fdist.rank_and_world()
    if "once" in parts:  # a key that is never reused: every rank builds rank 0's one
        parts = {**parts, "once": fdist.broadcast_object(parts["once"])}
        fp = combine(parts)
    folder = s.root / fp
    keys = fdist.all_gather_object((fp, socket.gethostname()))
    differ = [r for r, (key, _) in enumerate(keys) if key != keys[0][0]]
    if differ:
        raise DataError(
            f"under torch.distributed every rank must build a disk cache of the same model, data and cache "
            f"settings (fastft shards the rows between the ranks itself), but rank {differ[0]} has cache key "
            f"{keys[differ[0]][0][:12]} and rank 0 {keys[0][0][:12]}. Give every rank the whole dataset (not a "
            "DistributedSampler's share of it), the same model weights and the same settings."
        )
    verify = len({host for _, host in keys}) > 1 if VERIFY_SHARDS is None else VERIFY_SHARDS
    with contextlib.ExitStack() as held:
        plan, probe = None, None
        if rank == 0:
            try:
                held.enter_context(disk.build_lock(s.root, fp, on_wait=lambda: log.warning(
                    "fastft: another process is building cache %s; waiting for it to finish.", fp[:12])))
                plan, probe = _prepare_shards(cls, writer, source, n, s, fp, parts, reason)
            except BaseException as exc:
                fdist.broadcast_object({"error": _describe(exc)})
                raise
        plan = fdist.broadcast_object(plan)
        if "error" in plan:
            raise CacheError(f"rank 0 could not prepare cache {fp[:12]} for a sharded build: {plan['error']}")
        if plan["status"] == "complete":
            cache = cls.from_folder(folder)
            _register(cache)
            return cache.with_telemetry(hit=True, reason="hit: built by another process",
                                        build_seconds=time.perf_counter() - t_start, prefix_seconds=0.0,
                                        write_seconds=0.0, prefix_calls=0, rows_computed=0)

        summary, error = _write_share(writer, source, n, s, folder, plan, probe, rank, world)
        summaries = fdist.all_gather_object(summary)
        failed = [(r, o) for r, o in enumerate(summaries) if not o["ok"] and not o["layout"]]
        if failed:
            if error is not None:
                raise error
            r, o = failed[0]
            raise CacheError(
                f"rank {r} failed while building cache {fp[:12]}: {o['error']} The chunks every rank committed "
                "are kept: running the job again resumes the build."
            )
        if any(o["layout"] for o in summaries):
            if rank == 0:
                log.warning("fastft: cache %s: %s; rebuilding it from scratch.", fp[:12],
                            next(o["error"] for o in summaries if o["layout"]))
                disk.discard_folder(folder)
            fdist.barrier()  # the folder is gone for every rank before anyone starts again
            return None

        final = None
        if rank == 0:
            try:
                final = _finish_shards(writer, source, n, s, folder, plan, summaries, verify, t_start)
            except BaseException as exc:
                fdist.broadcast_object({"error": _describe(exc)})
                raise
        final = fdist.broadcast_object(final)
        if "error" in final:
            raise CacheError(f"rank 0 could not complete cache {fp[:12]}: {final['error']} The chunks every rank "
                             "committed are kept: running the job again resumes the build.")
    telemetry = dict(final, prefix_seconds=summary["prefix_seconds"], write_seconds=summary["write_seconds"],
                     prefix_calls=summary["prefix_calls"], rows_computed=summary["rows"],
                     build_seconds=time.perf_counter() - t_start)
    del writer
    cache = cls.from_folder(folder, telemetry=telemetry, verified=True)  # the build checked its shards
    _register(cache)
    return cache


def _prepare_shards(cls, writer: Writer, source, n, s: Settings, fp, parts, reason) -> tuple[dict, Any]:
    """Rank 0, under the build lock: (plan sent to every rank, probe of chunk 0 or None).

    A new folder is created from the first chunk's activations (the probe, which rank 0 then
    writes as its first chunk); an interrupted one keeps its verified committed chunks, every
    rank's, now listed in ``journal.json`` alone."""
    folder = s.root / fp
    if _complete_cache(cls, folder) is not None:
        return {"status": "complete"}, None
    manifest = _resumable_manifest(folder, fp, parts, n, s)
    probe, committed = None, []
    if manifest is None:
        manifest, probe = _create_folder(writer, source, n, s, folder, fp, parts, None)
    else:
        layout = disk.arrays(manifest)
        with disk.write_errors(folder, "opening its files"):
            tensors = {a.name: disk.map_array(folder, a, writable=False) for a in layout}
        journal = _read_journal(folder, n, s.views)
        reused = _drop_bad_chunks(journal, tensors, layout, n)
        with disk.write_errors(folder, "merging the journals of its ranks", committed_rows=reused):
            journal.save()
        committed = [[v, st, c] for (v, st), (c, _) in sorted(journal.chunks.items())]
        if reused:
            reason = f"resumed: {reused} of {n * s.views} rows were already committed"
    return {"status": "ready", "created": manifest["created"], "resumed": probe is None, "committed": committed,
            "reason": reason}, probe


def _shared_manifest(folder: Path, plan: dict, rank: int) -> dict:
    """The manifest rank 0 just made or resumed, as this rank sees it; CacheError when this
    rank cannot see that folder (the cache dir is not on a filesystem every rank shares)."""
    try:
        manifest = disk.read_manifest(folder)
    except CacheError:
        manifest = None
    if manifest is None or manifest.get("created") != plan["created"] or manifest.get("status") != "building":
        raise CacheError(
            f"rank {rank} on host {socket.gethostname()} does not see the cache folder {folder} that rank 0 "
            "prepared: a sharded build needs a cache_dir on a filesystem every rank shares. Pass cache_dir= "
            "(or set FASTFT_CACHE_DIR) to a shared folder (NFS, Lustre, GPFS, ...)."
        )
    return manifest


def _write_share(writer: Writer, source, n, s: Settings, folder: Path, plan: dict, probe, rank: int,
                 world: int) -> tuple[dict, BaseException | None]:
    """Compute and commit this rank's share of the missing chunks. Returns (summary for the
    other ranks, this rank's error or None): an Exception is reported, not raised, so that
    every rank reaches the next collective and fails with it."""
    summary = {"ok": True, "layout": False, "error": "", "rows": 0}
    error = None
    try:
        manifest = _shared_manifest(folder, plan, rank)
        layout, tensors = _attach(writer, folder, manifest, plan["resumed"])
        committer = _Committer(folder, layout, tensors, disk.Journal(folder, n, s.views, shard=rank), n)
        skip = _ShardSkip({tuple(c) for c in plan["committed"]}, rank, world)
        progress = replace(s, progress=s.progress and rank == 0)  # one bar: rank 0's share
        try:
            summary["rows"] = _run_chunks(writer, source, n, progress, probe, skip, committer.done, 0, share=True)
        except BaseException:
            try:
                committer.commit()  # chunks fully written before the error are kept for the resume
            except Exception as exc:
                log.warning("fastft: could not commit the finished chunks of cache %s: %s", folder.name[:12], exc)
            raise
        committer.commit()
    except _LayoutMismatch as exc:
        summary.update(ok=False, layout=True, error=str(exc))
    except Exception as exc:
        summary.update(ok=False, error=_describe(exc))
        error = exc
    t = writer.timer
    summary.update(prefix_calls=t.prefix_calls, prefix_seconds=t.prefix, write_seconds=t.write)
    return summary, error


def _finish_shards(writer: Writer, source, n, s: Settings, folder: Path, plan: dict, summaries: list[dict],
                   verify: bool, t_start: float) -> dict:
    """Rank 0, after every rank's share: merge the journals, complete the manifest; returns
    the build's telemetry."""
    manifest = disk.read_manifest(folder)
    layout = disk.arrays(manifest)
    with disk.write_errors(folder, "opening its files"):
        tensors = {a.name: disk.map_array(folder, a) for a in layout}
    journal = disk.Journal(folder, n, s.views)  # journal.json and every rank's journal
    if verify:
        listed = journal.rows
        if _drop_bad_chunks(journal, tensors, layout, n) != listed:
            log.warning("fastft: cache %s: %d rows written by the ranks did not match their checksums; "
                        "recomputing them on rank 0.", folder.name[:12], listed - journal.rows)
    if not journal.covers(n, s.views):  # only chunks that failed the verification
        writer.storages = [TapStorage(tensors[t.name], tensors.get(t.name + ".scales", torch.empty(0)))
                           for t in writer.taps]
        writer.labels = tensors["labels"]
        committer = _Committer(folder, layout, tensors, journal, n)
        repaired = _run_chunks(writer, source, n, s, None, journal.is_committed, committer.done, journal.rows)
        committer.commit()
        summaries[0] = dict(summaries[0], rows=summaries[0]["rows"] + repaired, prefix_calls=writer.timer.prefix_calls)
    with disk.write_errors(folder, "merging the journals of its ranks", committed_rows=journal.rows):
        journal.save()
    if not journal.covers(n, s.views):
        raise CacheError(f"cache {folder.name}: the data yielded fewer samples than its length {n}; "
                         "the build is incomplete.")
    by_rank = {"prefix_calls_by_rank": [o["prefix_calls"] for o in summaries],
               "rows_computed_by_rank": [o["rows"] for o in summaries]}
    telemetry = {"rows": n * s.views, "bytes": {"disk": sum(a.nbytes for a in layout)},
                 "build_seconds": time.perf_counter() - t_start,
                 "prefix_seconds": sum(o["prefix_seconds"] for o in summaries),
                 "write_seconds": sum(o["write_seconds"] for o in summaries), "hit": False, "reason": plan["reason"],
                 "prefix_calls": sum(by_rank["prefix_calls_by_rank"]),
                 "rows_computed": sum(by_rank["rows_computed_by_rank"]),
                 "rows_reused": sum(c for _, _, c in plan["committed"]), "world_size": len(summaries), **by_rank}
    manifest.update(status="complete", telemetry=telemetry)
    with disk.write_errors(folder, "marking it complete", committed_rows=journal.rows):
        disk.write_json_atomic(folder / disk.MANIFEST, manifest)
    return telemetry
