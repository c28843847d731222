"""The on-disk format of a feature cache: folder, manifest, raw files, journal and lock.

One folder per fingerprint under the cache dir::

    <cache_dir>/<fingerprint>/
        manifest.json     layout (rows, views, taps, dtypes, shapes), key parts, status
        tap<i>.bin        rows of tap i, row-major [views * N, D] in the storage dtype
        tap<i>.scales.bin float32 [views * N] when the dtype is int8
        labels.bin        row-major [N, *label_shape]
        journal.json      the committed chunks, each with a crc32 per file
    <cache_dir>/.locks/<fingerprint>.lock   flock'ed by the one process building it

Row ``v * N + i`` holds view ``v`` of sample ``i``. A chunk is a range of samples of one
view; it is committed only after its bytes are fsynced, by rewriting the journal through a
temporary file, fsync and an atomic rename, so the journal never lists bytes that could be
lost. An interrupted build therefore resumes from the journal, and bytes that do not match
it are detected (sizes on open, checksums by :func:`verify_folder`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fastft.errors import CacheCorruptError, CacheError, CacheLockedError

MANIFEST = "manifest.json"
JOURNAL = "journal.json"
LOCKS = ".locks"


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CacheCorruptError(f"the manifest names an unknown dtype {name!r}.")
    return dtype


# ---------------------------------------------------------------------------- atomic files
def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict, *, durable: bool = True) -> None:
    """Write ``payload`` to ``path`` so that readers see the old or the new file, never a mix;
    ``durable`` also makes it survive a machine crash (fsync of the file and the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CacheCorruptError(f"{path} cannot be read as JSON ({exc}); remove the cache and rebuild it.") from exc


# ---------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Array:
    """One raw file of a cache: its full shape, dtype, and whether it has a row per view."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    per_view: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()


def arrays(manifest: dict) -> list[Array]:
    """Every raw file a manifest describes."""
    n, k = manifest["num_rows"], manifest["num_views"]
    out = []
    for tap in manifest["taps"]:
        dtype = str_to_dtype(tap["dtype"])
        out.append(Array(tap["name"], tap["file"], dtype, (n * k, tap["dim"]), True))
        if tap.get("scales_file"):
            out.append(Array(tap["name"] + ".scales", tap["scales_file"], torch.float32, (n * k,), True))
    labels = manifest["labels"]
    out.append(Array("labels", labels["file"], str_to_dtype(labels["dtype"]), (n, *labels["shape"]), False))
    return out


def map_array(folder: Path, array: Array, *, create: bool = False, writable: bool = True) -> torch.Tensor:
    """A tensor over the array's file, memory-mapped: shared when ``writable`` (writes reach
    the file), copy-on-write otherwise (a reader can never change the cache on disk).

    ``create`` makes (or extends) the file to its full size first; sparse files cost no
    disk until written.
    """
    path = folder / array.file
    if create:
        with open(path, "ab") as f:
            if os.fstat(f.fileno()).st_size != array.nbytes:
                f.truncate(array.nbytes)
    raw = np.memmap(path, dtype=np.uint8, mode="r+" if writable else "c", shape=(array.nbytes,))
    return torch.from_numpy(raw).view(array.dtype).view(array.shape)


def check_sizes(folder: Path, manifest: dict) -> None:
    """Raise CacheCorruptError when a file is missing or its size does not match the manifest."""
    for array in arrays(manifest):
        path = folder / array.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheCorruptError(f"cache {folder.name}: {array.file} is missing; remove the cache and rebuild it.") from None
        if size != array.nbytes:
            raise CacheCorruptError(
                f"cache {folder.name}: {array.file} has {size} bytes but the manifest expects "
                f"{array.nbytes} (truncated or overwritten); remove the cache and rebuild it."
            )


# ---------------------------------------------------------------------------- chunks
def _rows(array: Array, view: int, start: int, count: int, n: int) -> slice | None:
    if array.per_view:
        return slice(view * n + start, view * n + start + count)
    return slice(start, start + count) if view == 0 else None


def chunk_checksums(tensors: dict[str, torch.Tensor], layout: list[Array], view: int, start: int,
                    count: int, n: int) -> dict[str, int]:
    """crc32 of the bytes of one chunk in each file (labels only in view 0's chunks)."""
    sums = {}
    for array in layout:
        rows = _rows(array, view, start, count, n)
        if rows is None:
            continue
        block = tensors[array.name][rows].contiguous()
        sums[array.file] = zlib.crc32(memoryview(block.view(torch.uint8).numpy()).cast("B"))
    return sums


class Journal:
    """The set of committed chunks: ``(view, start) -> (count, {file: crc32})``."""

    def __init__(self, folder: Path):
        self.path = folder / JOURNAL
        self.chunks: dict[tuple[int, int], tuple[int, dict[str, int]]] = {}
        if self.path.exists():
            for view, start, count, sums in read_json(self.path).get("chunks", []):
                self.chunks[(view, start)] = (count, sums)

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
        payload = {"chunks": [[v, s, c, sums] for (v, s), (c, sums) in sorted(self.chunks.items())]}
        write_json_atomic(self.path, payload)

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
    """Flush the written pages of every file to disk (Linux writes back MAP_SHARED pages on fsync)."""
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
    journal = Journal(folder)
    n = manifest["num_rows"]
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
            + "; the bytes on disk were changed after they were written. Remove the cache and rebuild it."
        )
    complete = journal.covers(n, manifest["num_views"])
    if manifest.get("status") == "complete" and not complete:
        raise CacheCorruptError(f"cache {folder.name}: marked complete but its journal does not cover every row.")
    return {"fingerprint": manifest["fingerprint"], "path": str(folder), "chunks": len(journal.chunks),
            "complete": complete, "ok": True}


def read_manifest(folder: Path) -> dict:
    try:
        manifest = read_json(folder / MANIFEST)
    except FileNotFoundError:
        raise CacheError(f"{folder} is not a fastft cache (no {MANIFEST}).") from None
    from fastft.cache.fingerprint import FORMAT_VERSION

    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(
            f"cache {folder.name} has format version {manifest.get('format_version')}, this fastft "
            f"reads version {FORMAT_VERSION}; remove it and rebuild."
        )
    return manifest


# ---------------------------------------------------------------------------- lock
#: Longest wait for another process's build of the same cache (seconds); FASTFT_LOCK_TIMEOUT overrides.
LOCK_TIMEOUT_S = 6 * 3600.0


@contextmanager
def build_lock(cache_dir: Path, fingerprint: str, *, timeout: float | None = None,
               on_wait=None) -> Iterator[None]:
    """Hold the exclusive build lock of ``fingerprint``; wait (polling) while another process
    holds it. The kernel drops an flock when its holder dies, so a killed builder never
    leaves a stale lock. Raises CacheLockedError after ``timeout`` seconds."""
    if timeout is None:
        timeout = float(os.environ.get("FASTFT_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    locks = cache_dir / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{fingerprint}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                if time.monotonic() >= deadline:
                    raise CacheLockedError(
                        f"another process has been building cache {fingerprint} for more than "
                        f"{timeout:.0f} s; wait for it or raise FASTFT_LOCK_TIMEOUT."
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
