"""The journal of a disk cache: which chunks are committed, with the checksums of their bytes,
and the checks of those bytes when a cache is read (:func:`verify_folder`, :class:`ChunkVerifier`).

A chunk is a range of samples of one view. It is committed only after its bytes are fsynced,
by rewriting ``journal.json`` through a temporary file, fsync and an atomic rename, so the
journal never lists bytes that could be lost. During a sharded build each rank commits to its
own ``journal.rank<r>.json``; reading a journal merges them, saving it folds them in.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from fastft.cache.disk import (
    JOURNAL,
    SHARD_JOURNAL,
    SHARD_JOURNAL_RE,
    Array,
    arrays,
    check_sizes,
    is_int,
    map_array,
    read_json,
    read_manifest,
    write_json_atomic,
)
from fastft.errors import CacheCorruptError


def _rows(array: Array, view: int, start: int, count: int, n: int) -> slice | None:
    if array.per_view:
        return slice(view * n + start, view * n + start + count)
    return slice(start, start + count) if view == 0 else None


def chunk_checksums(
    tensors: dict[str, torch.Tensor], layout: list[Array], view: int, start: int, count: int, n: int
) -> dict[str, int]:
    """crc32 of the bytes of one chunk in each file (labels only in view 0's chunks)."""
    sums = {}
    for array in layout:
        rows = _rows(array, view, start, count, n)
        if rows is None:
            continue
        block = tensors[array.name][rows].contiguous()
        sums[array.file] = zlib.crc32(memoryview(block.view(torch.uint8).numpy()).cast("B"))
    return sums


def _journal_entries(payload: object, path: Path, n: int | None, views: int | None) -> list:
    """The chunk entries of a journal file, each checked to be
    ``[view, start, count, {file: crc32}]`` within the cache's bounds."""

    def bad(why: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"{path} is not a valid journal ({why}); remove the cache and rebuild it."
        )

    if not isinstance(payload, dict) or not isinstance(payload.get("chunks", []), list):
        raise bad("expected an object with a list of chunks")
    entries = payload.get("chunks", [])
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise bad(f"entry {entry!r:.80} is not [view, start, count, checksums]")
        view, start, count, sums = entry
        if not (
            is_int(view)
            and is_int(start)
            and is_int(count)
            and view >= 0
            and start >= 0
            and count >= 1
        ):
            raise bad(f"entry {entry!r:.80} has a bad view, start or count")
        if (n is not None and start + count > n) or (views is not None and view >= views):
            raise bad(
                f"chunk (view {view}, samples {start}..{start + count - 1}) is outside the cache"
            )
        if not (
            isinstance(sums, dict)
            and all(isinstance(k, str) and is_int(v) for k, v in sums.items())
        ):
            raise bad(f"entry {entry!r:.80} has bad checksums")
    return entries


def shard_journals(folder: Path) -> list[Path]:
    """The rank journals of a sharded build in ``folder``, by rank."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = SHARD_JOURNAL_RE.fullmatch(path.name)
        if match and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def remove_journals(folder: Path) -> None:
    """Forget every committed chunk of ``folder`` (``journal.json`` and the rank journals)."""
    for path in [folder / JOURNAL, *shard_journals(folder)]:
        path.unlink(missing_ok=True)


class Journal:
    """The set of committed chunks: ``(view, start) -> (count, {file: crc32})``."""

    def __init__(
        self,
        folder: Path,
        n: int | None = None,
        views: int | None = None,
        *,
        shard: int | None = None,
    ):
        """Read the journal of ``folder`` (empty when there is none); CacheCorruptError when it
        is not a journal or, given the cache's ``n`` samples and ``views``, names rows outside it.

        By default this is ``journal.json`` merged with the rank journals a sharded build left
        (their chunks are newer: they win where chunks overlap), and :meth:`save` writes the
        merge to ``journal.json`` and then removes the rank files it read. ``shard=r`` is rank
        r's own journal in a sharded build: only ``journal.rank<r>.json``, read and written.
        """
        self.path = folder / (JOURNAL if shard is None else SHARD_JOURNAL.format(int(shard)))
        self.chunks: dict[tuple[int, int], tuple[int, dict[str, int]]] = {}
        self._absorbed = [] if shard is not None else shard_journals(folder)
        if self.path.exists():
            for view, start, count, sums in _journal_entries(
                read_json(self.path), self.path, n, views
            ):
                self.chunks[(view, start)] = (count, sums)
        for path in self._absorbed:
            for view, start, count, sums in _journal_entries(read_json(path), path, n, views):
                self.add(view, start, count, sums)

    def is_committed(self, view: int, start: int, count: int) -> bool:
        entry = self.chunks.get((view, start))
        return entry is not None and entry[0] == count

    def add(self, view: int, start: int, count: int, sums: dict[str, int]) -> None:
        """Record a chunk (not yet durable: see :meth:`save`); overlapping chunks of the same
        view are dropped because their bytes were just overwritten."""
        stop = start + count
        for (v, s), (c, _) in list(self.chunks.items()):
            if v == view and s < stop and start < s + c:
                del self.chunks[(v, s)]
        self.chunks[(view, start)] = (count, sums)

    def drop(self, view: int, start: int) -> None:
        self.chunks.pop((view, start), None)

    def save(self) -> None:
        """Make the journal durable (the rank journals it merged are removed once it is)."""
        payload = {"chunks": [[v, s, c, sums] for (v, s), (c, sums) in sorted(self.chunks.items())]}
        write_json_atomic(self.path, payload)
        for path in self._absorbed:
            path.unlink(missing_ok=True)
        self._absorbed = []

    def covers(self, n: int, views: int) -> bool:
        """True when the committed chunks cover every sample of every view."""
        for view in range(views):
            covered = 0
            for (v, s), (c, _) in sorted(self.chunks.items()):
                if v != view:
                    continue
                if s > covered:
                    return False
                covered = max(covered, s + c)
            if covered < n:
                return False
        return True

    @property
    def rows(self) -> int:
        return sum(c for c, _ in self.chunks.values())


def fsync_files(folder: Path, layout: list[Array]) -> None:
    """Flush the written pages of every file to disk (Linux writes back MAP_SHARED pages on
    fsync)."""
    for array in layout:
        fd = os.open(folder / array.file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def verify_folder(folder: Path) -> dict:
    """Check a cache folder: manifest, file sizes, and the crc32 of every committed chunk.

    Returns a summary dict; raises CacheCorruptError naming the files and chunks that fail.
    """
    manifest = read_manifest(folder)
    check_sizes(folder, manifest)
    layout = arrays(manifest)
    tensors = {a.name: map_array(folder, a, writable=False) for a in layout}
    n = manifest["num_rows"]
    journal = Journal(folder, n, manifest["num_views"])
    bad = []
    for (view, start), (count, sums) in sorted(journal.chunks.items()):
        actual = chunk_checksums(tensors, layout, view, start, count, n)
        for file, crc in sums.items():
            if actual.get(file) != crc:
                bad.append(f"{file} (view {view}, samples {start}..{start + count - 1})")
    if bad:
        raise CacheCorruptError(
            f"cache {folder.name}: checksum mismatch in {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + (
                "; the bytes on disk were changed after they were written. "
                "Remove the cache and rebuild it."
            )
        )
    complete = journal.covers(n, manifest["num_views"])
    if manifest.get("status") == "complete" and not complete:
        raise CacheCorruptError(
            f"cache {folder.name}: marked complete but its journal does not cover every row."
        )
    return {
        "fingerprint": manifest["fingerprint"],
        "path": str(folder),
        "chunks": len(journal.chunks),
        "complete": complete,
        "ok": True,
    }


# ---------------------------------------------------------------------------- checks on read
#: Caches up to this size are checked whole when opened (a corrupt one is then rebuilt before
#: anything reads it); larger ones chunk by chunk, the first time a row of a chunk is read.
VERIFY_AT_OPEN_BYTES = 1 << 30


class ChunkVerifier:
    """Checks a complete cache's bytes against its journal's checksums before they are used:
    the labels when the cache is opened, each chunk of features the first time a row of it
    is read in this process (:meth:`check`), so that corrupt features never reach training."""

    def __init__(self, folder: Path, manifest: dict, tensors: dict[str, torch.Tensor]):
        self.folder, self.tensors = folder, tensors
        self.n, views = manifest["num_rows"], manifest["num_views"]
        self.layout = arrays(manifest)
        journal = Journal(folder, self.n, views)
        entries = sorted((v, s, c, sums) for (v, s), (c, sums) in journal.chunks.items())
        self._chunks = entries
        # Chunk of every row: physical row r = view * n + sample; chunks cover each view in order.
        starts = [v * self.n + s for v, s, _, _ in entries]
        self._starts = torch.tensor(starts, dtype=torch.int64)
        self._ends = torch.tensor([v * self.n + s + c for v, s, c, _ in entries], dtype=torch.int64)
        self._verified = torch.zeros(len(entries), dtype=torch.bool)
        self.done = False
        self._check_files([a for a in self.layout if not a.per_view], range(len(entries)))

    def check(self, rows: torch.Tensor) -> None:
        """CacheCorruptError unless every chunk holding one of the physical ``rows`` matches its
        checksums."""
        if self.done or rows.numel() == 0:
            return
        index = torch.searchsorted(self._starts, rows.to("cpu", torch.int64), right=True) - 1
        index = index.clamp_(min=0).unique()
        todo = index[~self._verified[index]]
        if todo.numel():
            self._check_files([a for a in self.layout if a.per_view], todo.tolist())
            self._verified[todo] = True
            self.done = bool(self._verified.all())

    def check_all(self) -> None:
        """Check every chunk now."""
        if not self.done:
            self._check_files([a for a in self.layout if a.per_view], range(len(self._chunks)))
            self._verified[:] = True
            self.done = True

    def _check_files(self, layout: list[Array], chunk_ids) -> None:
        bad = []
        for i in chunk_ids:
            view, start, count, sums = self._chunks[i]
            actual = chunk_checksums(self.tensors, layout, view, start, count, self.n)
            bad += [
                f"{f} (view {view}, samples {start}..{start + count - 1})"
                for f, crc in actual.items()
                if sums.get(f) != crc
            ]
            if bad:
                break
        if bad:
            raise CacheCorruptError(
                f"cache {self.folder.name}: checksum mismatch in {', '.join(bad)}; the bytes on "
                "disk changed after they were written. Its features are not used: remove the "
                f"cache (fastft cache rm {self.folder.name[:12]}) and build it again."
            )
