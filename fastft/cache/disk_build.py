"""Building a cache on disk in one process: a folder of preallocated memory-mapped files
written chunk by chunk, each chunk committed to the journal after an fsync, so that an
interrupted build resumes from what it committed (under the build lock, which the caller
holds). Also the pieces a sharded build shares (:mod:`fastft.cache.sharded`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastft.cache import disk, folders, journal
from fastft.cache.disk import FORMAT_VERSION
from fastft.cache.job import Job, run_chunks
from fastft.cache.layout import TapInfo, TapStorage, dtype_str
from fastft.cache.store import Store, open_folder
from fastft.cache.telemetry import describes
from fastft.cache.writer import LayoutMismatch, Probe, Writer
from fastft.data.source_base import Chunk
from fastft.errors import CacheCorruptError, CacheError

log = logging.getLogger("fastft.cache")

#: A disk build commits its finished chunks (fsync + journal rename) at most this often, and
#: always at the end or when interrupted by an exception; a killed process loses at most this
#: much work. Per-chunk commits would pay an fsync per batch.
COMMIT_INTERVAL_S = 1.0


def build_on_disk(job: Job, probe: Probe | None) -> Store:
    """Build (or resume) the disk cache of ``job``; the caller holds the build lock."""
    writer, folder, n, s = job.writer, job.folder, job.n, job.s
    manifest = resumable_manifest(job)
    resumed = manifest is not None
    if manifest is None:
        manifest, probe = create_folder(job, probe)
    layout, tensors = attach(writer, folder, manifest, resumed)
    committed = read_journal(
        folder, n, s.views
    )  # with the rank journals of a sharded build, if any
    reused = drop_bad_chunks(committed, tensors, layout, n)
    if resumed and job.pending is not None:  # keep only chunks of samples that hash the same
        job.pending.on_resume(folder, committed, s)
        reused = committed.rows
    if journal.shard_journals(folder):  # one journal again, even when nothing is left to compute
        with folders.write_errors(
            folder, "merging the journals of its ranks", committed_rows=reused
        ):
            committed.save()
    if reused:
        job.reason = f"resumed: {reused} of {n * s.views} rows were already committed"
    committer = Committer(folder, layout, tensors, committed, n)
    if job.pending is not None:
        committer.before_save = job.pending.on_commit
    try:
        run_chunks(writer, job.source, probe, committed.is_committed, committer.done, reused)
    except LayoutMismatch as exc:  # raised before any byte of this run was written
        log.warning("fastft: cache %s: %s; rebuilding it from scratch.", job.fp[:12], exc)
        del tensors, writer.storages, writer.labels, committer
        writer.expected_layout = None
        folders.discard_folder(folder)
        return build_on_disk(job, None)
    except BaseException:
        try:
            # Chunks fully written before an interruption are kept for the resume.
            committer.commit()
        except Exception as exc:  # the interruption is the error to report; this one is logged
            log.warning(
                "fastft: could not commit the finished chunks of cache %s: %s", job.fp[:12], exc
            )
        raise
    committer.commit()
    if not committed.covers(n, s.views):
        raise CacheError(
            f"cache {job.fp}: the data yielded fewer samples than its length {n}; the build is "
            "incomplete."
        )
    telemetry = job.telemetry("disk", sum(a.nbytes for a in layout), rows_reused=reused)
    manifest.update(status="complete", telemetry=telemetry)
    with folders.write_errors(folder, "marking it complete", committed_rows=committed.rows):
        disk.write_json_atomic(folder / disk.MANIFEST, manifest)
    # Let the writable mapping go before the read-only one is made (two mappings of the same
    # pages would count twice in this process's memory). Its checksums were computed here from
    # these bytes: the cache needs no second check in this process.
    del tensors, writer.storages, writer.labels, committer
    return open_folder(folder, telemetry=telemetry, verified=True)


def complete_cache(folder: Path) -> Store | None:
    """The cache in ``folder`` when another process completed it (checked under the build
    lock); None when there is none, or it is incomplete, unreadable or corrupt (rebuilt)."""
    if not (folder / disk.MANIFEST).is_file():
        return None
    try:
        if disk.read_manifest(folder).get("status") == "complete":
            return open_folder(folder)
    except CacheError:  # unreadable or corrupt (CacheCorruptError is a CacheError)
        pass
    return None


def create_folder(job: Job, probe: Probe | None) -> tuple[dict, Probe]:
    """A new cache folder (manifest and preallocated files) laid out from the first chunk's
    activations (``probe``, computed here when None); returns (manifest, probe)."""
    writer, folder = job.writer, job.folder
    if probe is None:
        probe = writer.probe(job.source)
    taps, label_layout = writer.layout_of(probe)
    nbytes = writer.total_bytes(taps, label_layout)
    folders.check_free_space(folder, nbytes)
    try:
        with folders.write_errors(folder, f"creating its files ({nbytes} bytes)"):
            return new_folder(job, taps, label_layout), probe
    except BaseException:
        folders.discard_folder(folder)  # nothing in a new folder is committed: free its space
        raise


def new_folder(job: Job, taps: list[TapInfo], label_layout: dict) -> dict:
    """Make the folder, its preallocated files and its manifest (status ``building``)."""
    folder, s = job.folder, job.s
    folder.mkdir(parents=True, exist_ok=True)
    folders.ensure_real_folder(folder)
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": job.fp,
        "parts": job.parts,
        "status": "building",
        "created": time.time(),
        "num_rows": job.n,
        "num_views": s.views,
        "dtype": s.dtype,
        "pool": s.pool,
        "taps": [
            dict(
                t.to_json(),
                file=f"tap{i}.bin",
                scales_file=f"tap{i}.scales.bin" if t.dtype == torch.int8 else None,
            )
            for i, t in enumerate(taps)
        ],
        "labels": dict(label_layout, file="labels.bin"),
        "describes": describes(job.writer.prefix, job.source),
    }
    for array in disk.arrays(manifest):
        disk.map_array(folder, array, create=True)
    # Not fsynced: if this manifest is lost in a crash, the folder is simply rebuilt (no
    # journal entry can be durable before the first commit, which syncs the folder).
    disk.write_json_atomic(folder / disk.MANIFEST, manifest, durable=False)
    return manifest


def attach(writer: Writer, folder: Path, manifest: dict, resumed: bool) -> tuple[list, dict]:
    """Map a cache folder's files writable and make them ``writer``'s storage; a resumed
    build's first chunk must then match the manifest's layout. Returns (layout, tensors)."""
    layout = disk.arrays(manifest)
    with folders.write_errors(folder, "opening its files"):
        tensors = {a.name: disk.map_array(folder, a) for a in layout}
    writer.taps = [TapInfo.from_json(t) for t in manifest["taps"]]
    empty = torch.empty(0, dtype=torch.float32)
    writer.storages = [
        TapStorage(tensors[t.name], tensors.get(t.name + ".scales", empty)) for t in writer.taps
    ]
    writer.labels = tensors["labels"]
    writer.expected_layout = (writer.taps, manifest["labels"]) if resumed else None
    return layout, tensors


def read_journal(folder: Path, n: int, views: int) -> journal.Journal:
    """The committed chunks of an interrupted build (every rank's, for a sharded one); none
    when the journal is unreadable (nothing it lists can be trusted: every chunk is recomputed)."""
    try:
        return journal.Journal(folder, n, views)
    except CacheCorruptError as exc:
        log.warning("fastft: %s; recomputing every chunk.", exc)
        journal.remove_journals(folder)
        return journal.Journal(folder)


class Committer:
    """Commits finished chunks to ``journal``: fsync of the data files first (bytes durable
    before the journal names them), then the journal's atomic rewrite; at most every
    COMMIT_INTERVAL_S, and whenever :meth:`commit` is called."""

    def __init__(
        self,
        folder: Path,
        layout: list[disk.Array],
        tensors: dict,
        committed: journal.Journal,
        n: int,
    ):
        self.folder, self.layout, self.tensors, self.journal, self.n = (
            folder,
            layout,
            tensors,
            committed,
            n,
        )
        self.pending: list[Chunk] = []
        self.last = time.monotonic()
        #: Called with the folder after the data files' fsync, before the journal is saved.
        self.before_save: Callable[[Path], None] | None = None

    def done(self, chunk: Chunk) -> None:
        self.pending.append(chunk)
        if time.monotonic() - self.last >= COMMIT_INTERVAL_S:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        committed = self.journal
        with folders.write_errors(
            self.folder, "committing written rows", committed_rows=committed.rows
        ):
            journal.fsync_files(self.folder, self.layout)
            if self.before_save is not None:
                self.before_save(self.folder)
            saved = dict(committed.chunks)
            for c in self.pending:
                committed.add(
                    c.view,
                    c.start,
                    c.count,
                    journal.chunk_checksums(
                        self.tensors, self.layout, c.view, c.start, c.count, self.n
                    ),
                )
            try:
                committed.save()
            except BaseException:
                committed.chunks = (
                    saved  # not durable: the journal in memory says what the file says
                )
                raise
        self.pending.clear()
        self.last = time.monotonic()


def resumable_manifest(job: Job) -> dict | None:
    """The manifest of an interrupted build of exactly this key and these settings whose files
    are intact in size, else None (and whatever is in the folder is removed)."""
    folder, s = job.folder, job.s
    if not folder.exists():
        return None
    try:
        manifest = disk.read_manifest(folder)
        disk.check_sizes(folder, manifest)
        same = (
            manifest["fingerprint"] == job.fp
            and manifest["parts"] == job.parts
            and manifest["num_rows"] == job.n
            and manifest["num_views"] == s.views
            and manifest.get("dtype") == s.dtype
            and manifest.get("pool") == s.pool
            and all(
                (t["dtype"] == dtype_str(s.storage_dtype) and t["pool"] in (s.pool, "none"))
                or "source_dtype" in t
                for t in manifest["taps"]
            )
        )
        if manifest["status"] == "building" and same:
            return manifest
    except CacheError:
        pass
    folders.discard_folder(folder)
    return None


def drop_bad_chunks(
    committed: journal.Journal, tensors: dict, layout: list[disk.Array], n: int
) -> int:
    """Verify the committed chunks of a resumed build; forget any whose bytes changed.
    Returns the number of rows kept."""
    bad = [
        (v, st)
        for (v, st), (c, sums) in committed.chunks.items()
        if journal.chunk_checksums(tensors, layout, v, st, c, n) != sums
    ]
    for key in bad:
        committed.drop(*key)
    return committed.rows
