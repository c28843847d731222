"""Building one disk cache with every rank of a torch.distributed process group: each rank
computes its share of the chunks and commits them to a journal of its own (see
:func:`build_sharded`). Chunks and their random transforms are those of a single-process
build, so the files are byte for byte the same.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastft import distributed as fdist
from fastft.cache import disk, folders, journal
from fastft.cache.disk_build import (
    Committer,
    attach,
    complete_cache,
    create_folder,
    drop_bad_chunks,
    read_journal,
    resumable_manifest,
)
from fastft.cache.fingerprint import combine
from fastft.cache.job import Job, run_chunks
from fastft.cache.layout import TapStorage
from fastft.cache.store import Store, open_folder
from fastft.cache.telemetry import Timer, hit_telemetry
from fastft.cache.writer import LayoutMismatch, Probe, Writer
from fastft.errors import CacheError, DataError

log = logging.getLogger("fastft.cache")

#: Check every chunk's checksum before a sharded build is marked complete, and recompute on
#: rank 0 any chunk that fails. None (the default): only when the ranks run on more than one
#: host, where a network filesystem may write a memory-mapped page back whole and so
#: overwrite a neighbouring rank's rows with stale bytes.
VERIFY_SHARDS: bool | None = None


class ShardSkip:
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


def build_sharded(job: Job) -> Store:
    """Build the disk cache ``fp`` with every rank of the torch.distributed process group.

    Every rank calls this (``FeatureCache.build`` with ``tier="disk"`` does, inside a process
    group of more than one rank) with the same model, data and settings:

    1. The ranks check that they build the same key.
    2. Rank 0, holding the cache's build lock (another job building the same key waits),
       creates the folder (manifest, preallocated files) or prepares the resume of an
       interrupted build: it verifies the chunks every rank committed and folds the rank
       journals into ``journal.json``. It sends every rank the set of committed chunks.
    3. Every rank maps the files writable and computes its share of the missing chunks
       (:class:`ShardSkip`), committing them to its own journal ``journal.rank<r>.json``;
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
    trim = job.writer.trim_key, job.writer.trim_sample  # length-aware batching, if set
    while True:
        job.writer = Writer(job.writer.prefix, job.s, job.n, Timer())
        job.writer.trim_key, job.writer.trim_sample = trim
        cache = _build_sharded_once(job)
        if cache is not None:
            return cache


def _build_sharded_once(job: Job) -> Store | None:
    """One attempt of :func:`build_sharded`; None when the interrupted build found on disk
    did not match the prefix (rank 0 removed it: build again from scratch)."""
    rank, world = fdist.rank_and_world()
    if "once" in job.parts:  # a key that is never reused: every rank builds rank 0's one
        job.parts = {**job.parts, "once": fdist.broadcast_object(job.parts["once"])}
        job.fp = combine(job.parts)
    writer, s, fp, folder = job.writer, job.s, job.fp, job.folder
    keys = fdist.all_gather_object((fp, socket.gethostname()))
    differ = [r for r, (key, _) in enumerate(keys) if key != keys[0][0]]
    if differ:
        raise DataError(
            "under torch.distributed every rank must build a disk cache of the same model, data "
            "and cache settings (fastft shards the rows between the ranks itself), but rank "
            f"{differ[0]} has cache key {keys[differ[0]][0][:12]} and rank 0 {keys[0][0][:12]}. "
            "Give every rank the whole dataset (not a DistributedSampler's share of it), the same "
            "model weights and the same settings."
        )
    verify = len({host for _, host in keys}) > 1 if VERIFY_SHARDS is None else VERIFY_SHARDS
    with contextlib.ExitStack() as held:
        plan, probe = None, None
        if rank == 0:
            try:
                held.enter_context(
                    folders.build_lock(
                        s.root,
                        fp,
                        on_wait=lambda: log.warning(
                            "fastft: another process is building cache %s; waiting for it to "
                            "finish.",
                            fp[:12],
                        ),
                    )
                )
                plan, probe = _prepare_shards(job)
            except BaseException as exc:
                fdist.broadcast_object({"error": _describe(exc)})
                raise
        plan = fdist.broadcast_object(plan)
        if "error" in plan:
            raise CacheError(
                f"rank 0 could not prepare cache {fp[:12]} for a sharded build: {plan['error']}"
            )
        if plan["status"] == "complete":
            return open_folder(folder).with_telemetry(
                **hit_telemetry(job.t_start, "hit: built by another process")
            )

        summary, error = _write_share(job, plan, probe, rank, world)
        summaries = fdist.all_gather_object(summary)
        failed = [(r, o) for r, o in enumerate(summaries) if not o["ok"] and not o["layout"]]
        if failed:
            if error is not None:
                raise error
            r, o = failed[0]
            raise CacheError(
                f"rank {r} failed while building cache {fp[:12]}: {o['error']} The chunks every "
                "rank committed are kept: running the job again resumes the build."
            )
        if any(o["layout"] for o in summaries):
            if rank == 0:
                log.warning(
                    "fastft: cache %s: %s; rebuilding it from scratch.",
                    fp[:12],
                    next(o["error"] for o in summaries if o["layout"]),
                )
                folders.discard_folder(folder)
            fdist.barrier()  # the folder is gone for every rank before anyone starts again
            return None

        final = None
        if rank == 0:
            try:
                final = _finish_shards(job, plan, summaries, verify)
            except BaseException as exc:
                fdist.broadcast_object({"error": _describe(exc)})
                raise
        final = fdist.broadcast_object(final)
        if "error" in final:
            raise CacheError(
                f"rank 0 could not complete cache {fp[:12]}: {final['error']} The chunks every "
                "rank committed are kept: running the job again resumes the build."
            )
    telemetry = dict(
        final,
        prefix_seconds=summary["prefix_seconds"],
        write_seconds=summary["write_seconds"],
        prefix_calls=summary["prefix_calls"],
        rows_computed=summary["rows"],
        build_seconds=time.perf_counter() - job.t_start,
    )
    del writer.storages, writer.labels
    return open_folder(folder, telemetry=telemetry, verified=True)  # the build checked its shards


def _prepare_shards(job: Job) -> tuple[dict, Probe | None]:
    """Rank 0, under the build lock: (plan sent to every rank, probe of chunk 0 or None).

    A new folder is created from the first chunk's activations (the probe, which rank 0 then
    writes as its first chunk); an interrupted one keeps its verified committed chunks, every
    rank's, now listed in ``journal.json`` alone."""
    folder, n, s, reason = job.folder, job.n, job.s, job.reason
    if complete_cache(folder) is not None:
        return {"status": "complete"}, None
    manifest = resumable_manifest(job)
    probe, committed = None, []
    if manifest is None:
        manifest, probe = create_folder(job, None)
    else:
        layout = disk.arrays(manifest)
        with folders.write_errors(folder, "opening its files"):
            tensors = {a.name: disk.map_array(folder, a, writable=False) for a in layout}
        record = read_journal(folder, n, s.views)
        reused = drop_bad_chunks(record, tensors, layout, n)
        with folders.write_errors(
            folder, "merging the journals of its ranks", committed_rows=reused
        ):
            record.save()
        committed = [[v, st, c] for (v, st), (c, _) in sorted(record.chunks.items())]
        if reused:
            reason = f"resumed: {reused} of {n * s.views} rows were already committed"
    return {
        "status": "ready",
        "created": manifest["created"],
        "resumed": probe is None,
        "committed": committed,
        "reason": reason,
    }, probe


def _shared_manifest(folder: Path, plan: dict, rank: int) -> dict:
    """The manifest rank 0 just made or resumed, as this rank sees it; CacheError when this
    rank cannot see that folder (the cache dir is not on a filesystem every rank shares)."""
    try:
        manifest = disk.read_manifest(folder)
    except CacheError:
        manifest = None
    if (
        manifest is None
        or manifest.get("created") != plan["created"]
        or manifest.get("status") != "building"
    ):
        raise CacheError(
            f"rank {rank} on host {socket.gethostname()} does not see the cache folder {folder} "
            "that rank 0 prepared: a sharded build needs a cache_dir on a filesystem every rank "
            "shares. Pass cache_dir= (or set FASTFT_CACHE_DIR) to a shared folder (NFS, Lustre, "
            "GPFS, ...)."
        )
    return manifest


def _write_share(
    job: Job, plan: dict, probe: Probe | None, rank: int, world: int
) -> tuple[dict, BaseException | None]:
    """Compute and commit this rank's share of the missing chunks. Returns (summary for the
    other ranks, this rank's error or None): an Exception is reported, not raised, so that
    every rank reaches the next collective and fails with it."""
    writer, folder, n, s = job.writer, job.folder, job.n, job.s
    summary = {"ok": True, "layout": False, "error": "", "rows": 0}
    error = None
    try:
        manifest = _shared_manifest(folder, plan, rank)
        layout, tensors = attach(writer, folder, manifest, plan["resumed"])
        committer = Committer(
            folder, layout, tensors, journal.Journal(folder, n, s.views, shard=rank), n
        )
        skip = ShardSkip({tuple(c) for c in plan["committed"]}, rank, world)
        # One bar: rank 0's share (``progress`` may be the bar's label).
        writer.s = replace(s, progress=s.progress if rank == 0 else False)
        try:
            summary["rows"] = run_chunks(
                writer, job.source, probe, skip, committer.done, 0, share=True
            )
        except BaseException:
            try:
                committer.commit()  # chunks fully written before the error are kept for the resume
            except Exception as exc:
                log.warning(
                    "fastft: could not commit the finished chunks of cache %s: %s",
                    folder.name[:12],
                    exc,
                )
            raise
        committer.commit()
    except LayoutMismatch as exc:
        summary.update(ok=False, layout=True, error=str(exc))
    except Exception as exc:
        summary.update(ok=False, error=_describe(exc))
        error = exc
    t = writer.timer
    summary.update(prefix_calls=t.prefix_calls, prefix_seconds=t.prefix, write_seconds=t.write)
    return summary, error


def _finish_shards(job: Job, plan: dict, summaries: list[dict], verify: bool) -> dict:
    """Rank 0, after every rank's share: merge the journals, complete the manifest; returns
    the build's telemetry."""
    writer, folder, n, s = job.writer, job.folder, job.n, job.s
    manifest = disk.read_manifest(folder)
    layout = disk.arrays(manifest)
    with folders.write_errors(folder, "opening its files"):
        tensors = {a.name: disk.map_array(folder, a) for a in layout}
    record = journal.Journal(folder, n, s.views)  # journal.json and every rank's journal
    if verify:
        listed = record.rows
        if drop_bad_chunks(record, tensors, layout, n) != listed:
            log.warning(
                "fastft: cache %s: %d rows written by the ranks did not match their checksums; "
                "recomputing them on rank 0.",
                folder.name[:12],
                listed - record.rows,
            )
    if not record.covers(n, s.views):  # only chunks that failed the verification
        writer.storages = [
            TapStorage(tensors[t.name], tensors.get(t.name + ".scales", torch.empty(0)))
            for t in writer.taps
        ]
        writer.labels = tensors["labels"]
        committer = Committer(folder, layout, tensors, record, n)
        repaired = run_chunks(
            writer, job.source, None, record.is_committed, committer.done, record.rows
        )
        committer.commit()
        summaries[0] = dict(
            summaries[0],
            rows=summaries[0]["rows"] + repaired,
            prefix_calls=writer.timer.prefix_calls,
        )
    with folders.write_errors(
        folder, "merging the journals of its ranks", committed_rows=record.rows
    ):
        record.save()
    if not record.covers(n, s.views):
        raise CacheError(
            f"cache {folder.name}: the data yielded fewer samples than its length {n}; "
            "the build is incomplete."
        )
    by_rank = {
        "prefix_calls_by_rank": [o["prefix_calls"] for o in summaries],
        "rows_computed_by_rank": [o["rows"] for o in summaries],
    }
    telemetry = {
        "rows": n * s.views,
        "bytes": {"disk": sum(a.nbytes for a in layout)},
        "build_seconds": time.perf_counter() - job.t_start,
        "prefix_seconds": sum(o["prefix_seconds"] for o in summaries),
        "write_seconds": sum(o["write_seconds"] for o in summaries),
        "hit": False,
        "reason": plan["reason"],
        "prefix_calls": sum(by_rank["prefix_calls_by_rank"]),
        "rows_computed": sum(by_rank["rows_computed_by_rank"]),
        "rows_reused": sum(c for _, _, c in plan["committed"]),
        "world_size": len(summaries),
        **by_rank,
    }
    manifest.update(status="complete", telemetry=telemetry)
    with folders.write_errors(folder, "marking it complete", committed_rows=record.rows):
        disk.write_json_atomic(folder / disk.MANIFEST, manifest)
    return telemetry
