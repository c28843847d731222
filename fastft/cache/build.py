"""Building a feature cache, or finding it built: the steps of :func:`build`.

1. Key: the content address of prefix, data, transform, views, dtype, numerics and pool
   (:mod:`fastft.cache.fingerprint`), computed now.
2. Reuse: a cache with that key in this process (any tier, :mod:`fastft.cache.registry`),
   or complete on disk, checked, is returned without running the prefix.
3. Layout: the first chunk's activations give each tap's width and shape; the tier is
   chosen from the total size; storage is allocated (memory, or memory-mapped files).
4. Chunks: the :class:`~fastft.cache.writer.Writer` runs the prefix chunk by chunk and
   writes each into its rows; a disk build commits them to a journal and resumes from it
   (:mod:`fastft.cache.disk_build`).

Inside a torch.distributed process group, a disk cache is built by every rank together
(:mod:`fastft.cache.sharded`); the memory tiers and ``auto`` are built by each rank alone.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastft import distributed as fdist
from fastft.cache import disk, folders, lengths, registry
from fastft.cache.amp import check_amp, resolve_amp
from fastft.cache.disk_build import build_on_disk, complete_cache
from fastft.cache.fingerprint import (
    CacheKey,
    complete_key,
    make_key,
    warn_if_self_changing,
    warn_if_transform_changed,
    warn_not_reusable,
)
from fastft.cache.job import Job, Pending, run_chunks
from fastft.cache.layout import (
    DTYPES,
    TIERS,
    TapStorage,
    allocate,
    choose_tier,
    dtype_name,
    memory_device,
    parse_bytes,
    pinned_overhead,
    str_dtype,
)
from fastft.cache.manage import apply_size_cap, cache_root
from fastft.cache.sharded import build_sharded
from fastft.cache.store import Store, open_folder
from fastft.cache.telemetry import Timer, announce, hit_telemetry
from fastft.cache.writer import Probe, Settings, Writer
from fastft.data import index_select
from fastft.data.sources import as_source
from fastft.errors import CacheCorruptError, CacheError, FastFTValueError
from fastft.ops import POOLS

log = logging.getLogger("fastft.cache")


# ---------------------------------------------------------------------------- settings
def check_views(views: int, transform: Callable | None) -> None:
    """FastFTValueError unless ``views`` is a count of views that ``transform`` can make."""
    if int(views) < 1:
        raise FastFTValueError(f"views must be ≥ 1, got {views}.")
    if views > 1 and transform is None:
        raise FastFTValueError(
            "views > 1 caches augmented views: pass the random transform= that makes them."
        )


def settings(
    prefix: nn.Module,
    *,
    dtype: str | torch.dtype,
    tier: str,
    views: int,
    transform: Callable | None,
    pool: str,
    mask_key: str,
    batch_size: int,
    num_workers: int,
    cache_dir: str | Path | None,
    max_memory: int | str | None,
    progress: bool | str,
    seed: int,
    device: torch.device | str | None,
    amp: str | None = None,
    transform_id: str | None = None,
) -> Settings:
    """The build's settings, checked (FastFTValueError naming what is wrong)."""
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
    return Settings(
        dtype=name,
        storage_dtype=DTYPES[name],
        tier=tier,
        views=int(views),
        transform=transform,
        pool=pool,
        mask_key=mask_key,
        batch_size=int(batch_size),
        num_workers=int(num_workers),
        root=cache_root(cache_dir),
        max_memory=parse_bytes(max_memory),
        progress=progress,
        seed=int(seed),
        device=torch.device(device),
        amp=resolve_amp(amp, device, "amp"),  # 'auto' and 'bf16' decided for this device here
        transform_id=transform_id,
    )


# ---------------------------------------------------------------------------- the build
def build(prefix: nn.Module, dataset: Any, **options: Any) -> Store:
    """See :meth:`fastft.FeatureCache.build` (``options``: its settings, see :func:`settings`):
    the cache, its decision logged in one line (named by the bar's label, e.g. "train cache";
    at DEBUG with ``progress=False``), then the size cap applied after a disk build."""
    cache = _build(prefix, dataset, **options)
    label = options.get("progress", True)
    announce(cache, label if isinstance(label, str) and label else "cache", quiet=not label)
    if cache.path is not None:
        folders.mark_used(cache.path)
        if not cache.telemetry.get("hit") and fdist.rank_and_world()[0] == 0:
            apply_size_cap(cache.path.parent, keep=registry.in_use() | {cache.fingerprint})
    return cache


def _build(
    prefix: nn.Module, dataset: Any, *, dataset_id: str | None = None, **options: Any
) -> Store:
    t_start = time.perf_counter()
    s = settings(prefix, **options)
    source = as_source(dataset)
    order = lengths.visit_order(source, s.mask_key, s.views, s.transform)
    key = make_key(
        prefix,
        source,
        dataset_id=dataset_id,
        transform=s.transform,
        transform_id=s.transform_id,
        views=s.views,
        seed=s.seed,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        dtype=s.dtype,
        pool=s.pool,
        mask_key=s.mask_key,
        amp=s.amp,
        device=s.device,
        defer_data=True,
        length_sorted=order is not None,
    )
    sharded = s.tier == "disk" and fdist.is_distributed()
    if key.pending and key.reusable and (sharded or registry.similar(key.parts, s.root)):
        # A cache may hold these data (or the ranks of a sharded build must agree on the key):
        # one hashing pass decides. Else the data are hashed while the cache is built (one
        # read of each sample).
        key = complete_key(key, source, s.batch_size, s.num_workers)
    source.check_unchanged()  # before anything is made: a dataset whose len() drifts is refused
    warned = not key.reusable
    if warned:
        warn_not_reusable(key)
    found, reason = _reuse(key, s, dataset_id, t_start)
    if found is not None:
        return found
    reason = reason or (
        registry.explain(key.parts, s.root)
        if key.reusable
        else "built for this use only (key not reusable)"
    )
    job = Job(
        Writer(prefix, s, source.n, Timer()), source, key.fingerprint, key.parts, reason, t_start
    )
    if order is not None:  # longest first, each batch cut to its longest sample
        source.visit_order, job.writer.trim_key = order, s.mask_key
        # The first cut is checked on the few samples cut the most (cheap: one short run).
        job.writer.trim_sample = index_select(source.X, order[-min(4, s.batch_size) :])
    if key.pending:
        job.pending = Pending(key, source)
    prefix_mode = prefix.training
    _train(
        prefix, False
    )  # the frozen part always runs in eval mode (BatchNorm running stats, no dropout)
    try:
        cache = build_sharded(job) if s.tier == "disk" and fdist.is_distributed() else _run(job)
    finally:
        _train(prefix, prefix_mode)
    if key.pending:  # built while every sample was hashed: its key is known now
        key = job.pending.finish()
        cache.fingerprint, cache.parts = key.fingerprint, key.parts
        if not key.reusable and not warned:  # what the data hide is known only now
            warn_not_reusable(key)
    registry.register(cache)
    if not key.reusable and cache.path is not None:
        _remove_at_exit(cache.path)
    if key.reusable and not cache.telemetry.get("hit"):
        warn_if_self_changing(prefix, key)
        warn_if_transform_changed(s.transform, key)
    return cache


def _reuse(
    key: CacheKey, s: Settings, dataset_id: str | None, t_start: float
) -> tuple[Store | None, str | None]:
    """``(cache, None)`` when a cache of ``key`` can be reused (from this process or disk,
    copied into the tier asked for), else ``(None, why it is built)``."""
    if not key.reusable:
        return None, None

    def hit(cache: Store, reason: str = "hit") -> Store:
        registry.register(cache)
        return cache.with_telemetry(**hit_telemetry(t_start, reason))

    known = registry.registered(key.fingerprint)
    if known is not None and s.tier in ("auto", known.tier):
        try:
            _check_labels(known, key, dataset_id)
        except CacheCorruptError:  # its labels were changed in place since: built again
            registry.forget(key.fingerprint)
            known = None
    if known is not None and s.tier in ("auto", known.tier):
        if known.tier == "disk" or _placed_for(known, s.device):
            return hit(known), None
        # Built in this process for another device (a CPU run, then a CUDA one): the same
        # bytes, copied where this device reads them best, not rebuilt and not read remotely.
        return hit(  # pragma: cuda
            _to_memory(known, replace(s, tier=known.tier)), "hit: copied for this device"
        ), None
    folder = s.root / key.fingerprint
    if (folder / disk.MANIFEST).is_file():
        try:
            found = open_folder(folder, expected=key.fingerprint)
            _check_labels(found, key, dataset_id)
            folders.mark_used(folder)
            if s.tier in ("auto", "disk"):
                return hit(found), None
            return hit(_to_memory(found, s), "hit: loaded from disk"), None
        except CacheCorruptError as exc:
            return None, f"rebuilt: the cache on disk was corrupt ({exc})"
        except CacheError:
            pass  # an interrupted build: resumed by the build
    return None, None


def _run(job: Job) -> Store:
    """Build ``job`` in one process: in memory, or on disk under the build lock."""
    s, writer = job.s, job.writer
    resuming = (job.folder / disk.MANIFEST).is_file()
    tier = "disk" if resuming and s.tier == "auto" else s.tier  # an interrupted disk build resumes
    probe, layout = None, None
    if tier in ("host", "device") or (tier == "auto" and not resuming):
        # The first chunk's activations tell the taps' widths, hence the size and the tier.
        probe = writer.probe(job.source)
        layout = writer.layout_of(probe)
        tier = choose_tier(
            tier,
            writer.total_bytes(*layout),
            s.device,
            s.max_memory,
            s.storage_dtype,
            pin_extra=pinned_overhead(job.n * s.views, layout[0]),  # pinned sizes round up
        )
    if tier != "disk":
        return _build_in_memory(job, tier, probe, layout)
    with folders.build_lock(
        s.root,
        job.fp,
        on_wait=lambda: log.warning(
            "fastft: another process is building cache %s; waiting for it to finish.", job.fp[:12]
        ),
    ):
        # A pending key's folder is never a hit: only its key's folder is (see Pending).
        cache = complete_cache(job.folder) if job.pending is None else None
        if cache is not None:
            timer = writer.timer
            return cache.with_telemetry(
                **hit_telemetry(
                    job.t_start, "hit: built by another process", timer.prefix, timer.prefix_calls
                )
            )
        cache = build_on_disk(job, probe)
        return cache if job.pending is None else job.pending.publish(job, cache)


def _build_in_memory(job: Job, tier: str, probe: Probe, layout: tuple[list, dict]) -> Store:
    s, writer, n = job.s, job.writer, job.n
    taps, label_layout = layout
    where, pin = memory_device(tier, s.device)
    writer.taps = taps
    writer.storages = [allocate(n * s.views, t.dim, t.dtype, where, pin) for t in taps]
    writer.labels = torch.zeros((n, *label_layout["shape"]), dtype=str_dtype(label_layout["dtype"]))
    written = run_chunks(writer, job.source, probe, lambda v, st, c: False, lambda chunk: None, 0)
    if written != n * s.views:
        raise CacheError(
            f"the data yielded {written // s.views} samples per view but its length is {n}; "
            "the cache was not completed."
        )
    nbytes = (
        sum(st.nbytes for st in writer.storages)
        + writer.labels.numel() * writer.labels.element_size()
    )
    return Store(
        fingerprint=job.fp,
        parts=job.parts,
        tier=tier,
        taps=taps,
        storages=writer.storages,
        labels=writer.labels,
        num_rows=n,
        num_views=s.views,
        telemetry=job.telemetry(tier, nbytes),
    )


# ---------------------------------------------------------------------------- helpers
def _train(prefix: nn.Module, mode: bool) -> None:
    """``prefix.train(mode)``; a module that has no modes (torch.export's, which refuses
    train() and eval()) is left as it is: it computes in the mode it was exported in."""
    try:
        prefix.train(mode)
    except NotImplementedError:
        pass


def _check_labels(cache: Store, key: CacheKey, dataset_id: str | None) -> None:
    """A reused cache must hold the labels of the data it is reused for (when they are known
    without another pass over the data): else CacheCorruptError (rebuilt) or, when the data
    were named by ``dataset_id``, a CacheError saying the id names other data."""
    if key.labels is None:
        return
    mine = key.labels.to(cache.labels.device)
    if (
        mine.shape == cache.labels.shape
        and mine.dtype == cache.labels.dtype
        and torch.equal(mine, cache.labels)
    ):
        return
    if dataset_id is not None:
        raise CacheError(
            f"dataset_id={dataset_id!r} names a cache whose labels differ from the labels of the "
            "data passed now: the id names other data. Pass a new dataset_id for these data (or "
            "none: fastft then hashes them)."
        )
    raise CacheCorruptError(f"cache {cache.fingerprint[:12]} holds other labels than its key says")


_REMOVE_AT_EXIT: list[Path] = []


def _remove_at_exit(folder: Path) -> None:
    """Remove a disk cache that can never be reused when this process ends."""
    if not _REMOVE_AT_EXIT:
        atexit.register(
            lambda: [folders.remove_folder(f, missing_ok=True) for f in _REMOVE_AT_EXIT]
        )
    _REMOVE_AT_EXIT.append(folder)


def _placed_for(cache: Store, device: torch.device) -> bool:
    """Whether an in-memory cache lives where its tier puts it for ``device`` (pinned or not)."""
    where, pin = memory_device(cache.tier, device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())  # pragma: cuda
    data = cache.storages[0].data
    return data.device == where and (where.type != "cpu" or data.is_pinned() == pin)


def _to_memory(found: Store, s: Settings) -> Store:
    """A complete cache (on disk, or in memory elsewhere) copied into the requested in-memory
    tier."""
    found.check_all()  # every row is read below: every checksum first
    where, pin = memory_device(s.tier, s.device)
    storages = []
    for st in found.storages:
        data = st.data.to(where, copy=True)
        scales = st.scales.to(where, copy=True)
        storages.append(
            TapStorage(data.pin_memory() if pin else data, scales.pin_memory() if pin else scales)
        )
    return Store(
        fingerprint=found.fingerprint,
        parts=found.parts,
        tier=s.tier,
        taps=found.taps,
        storages=storages,
        labels=found.labels.clone(),
        num_rows=found.num_rows,
        num_views=found.num_views,
        telemetry=dict(found.telemetry, bytes={s.tier: found.nbytes}),
    )
