"""The on-disk format of a feature cache: folder, manifest, raw files, journal and lock.

One folder per fingerprint under the cache dir::

    <cache_dir>/<fingerprint>/
        manifest.json     layout (rows, views, taps, dtypes, shapes), key parts, status
        tap<i>.bin        rows of tap i, row-major [views * N, D] in the storage dtype
        tap<i>.scales.bin float32 [views * N] when the dtype is int8
        labels.bin        row-major [N, *label_shape]
        journal.json      the committed chunks, each with a crc32 per file
        journal.rank<r>.json  while a sharded build runs: the chunks rank r committed
    <cache_dir>/.locks/<fingerprint>.lock   flock'ed by the one process building it

Row ``v * N + i`` holds view ``v`` of sample ``i``. A chunk is a range of samples of one
view; it is committed only after its bytes are fsynced, by rewriting the journal through a
temporary file, fsync and an atomic rename, so the journal never lists bytes that could be
lost. An interrupted build therefore resumes from the journal, and bytes that do not match
it are detected (sizes on open, checksums by :func:`verify_folder`).

A sharded build (several processes under torch.distributed) writes disjoint chunks of the
same preallocated files; each rank commits its own chunks to its own journal file, so no
two processes ever rewrite one file. Reading a journal merges ``journal.json`` with every
rank's file, and saving the merged journal folds the rank files into ``journal.json``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
import warnings
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
#: A rank's own journal during a sharded build (see :class:`Journal`).
SHARD_JOURNAL = "journal.rank{}.json"
_SHARD_JOURNAL_RE = re.compile(r"journal\.rank(\d{1,6})\.json")
LOCKS = ".locks"


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: Every dtype a manifest may name, by name: read from this table, never looked up on the
#: torch module with a string taken from a file.
_DTYPE_NAMES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


def str_to_dtype(name: str) -> torch.dtype:
    dtype = _DTYPE_NAMES.get(name) if isinstance(name, str) else None
    if dtype is None:
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
    # O_NOFOLLOW: a link planted at the temporary name must not redirect the write.
    with open(tmp, "w", opener=lambda name, flags: _open_nofollow(Path(name), flags)) as f:
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
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
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


#: What a file name in a manifest may look like: one plain name inside the cache folder (no
#: separators, no ``..``, not absolute), so a manifest can never make fastft read or write
#: outside its folder.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def safe_path(folder: Path, name: object) -> Path:
    """``folder / name`` for a file name taken from a manifest; CacheCorruptError unless it is a
    plain file name of this folder (path traversal, absolute paths, links are refused)."""
    if (not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (MANIFEST, JOURNAL)
            or _SHARD_JOURNAL_RE.fullmatch(name)):
        raise CacheCorruptError(
            f"cache {folder.name}: the manifest names the file {name!r}, which is not a plain file name "
            "of the cache folder; refusing to use it. Remove the cache and rebuild it."
        )
    path = folder / name
    if path.is_symlink():
        raise CacheCorruptError(
            f"cache {folder.name}: {name} is a symbolic link; fastft never follows links in a cache "
            "folder. Remove the cache and rebuild it."
        )
    return path


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link put there after safe_path looked
            raise CacheCorruptError(f"{path} is a symbolic link; fastft never follows links in a cache folder.") from None
        raise


def _allocate(fd: int, nbytes: int) -> None:
    """Give the file its full size with its blocks reserved now: a full disk then fails here,
    with ENOSPC, instead of killing the process with SIGBUS when a memory-mapped page
    cannot be written back later."""
    if os.fstat(fd).st_size == nbytes:
        return
    os.ftruncate(fd, nbytes)
    if nbytes and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def map_array(folder: Path, array: Array, *, create: bool = False, writable: bool = True) -> torch.Tensor:
    """A tensor over the array's file, memory-mapped and shared: writable when ``writable``
    (writes reach the file), else read-only, so that a reader can never change the cache on
    disk and no memory is reserved for it (a private writable mapping would be charged to
    RAM + swap in full, and refused for a cache larger than that).

    ``create`` makes (or extends) the file to its full size first, with its disk blocks
    reserved (see :func:`_allocate`). The file name must be a plain name of the folder and
    the file not a link (:func:`safe_path`).
    """
    path = safe_path(folder, array.file)
    flags = (os.O_RDWR | os.O_CREAT) if create else (os.O_RDWR if writable else os.O_RDONLY)
    fd = _open_nofollow(path, flags)
    with os.fdopen(fd, "r+b" if writable or create else "rb") as f:
        if create:
            _allocate(f.fileno(), array.nbytes)
        if array.nbytes == 0:
            return torch.empty(array.shape, dtype=array.dtype)
        raw = np.memmap(f, dtype=np.uint8, mode="r+" if writable or create else "r", shape=(array.nbytes,))
    if raw.flags.writeable:
        return torch.from_numpy(raw).view(array.dtype).view(array.shape)
    with warnings.catch_warnings():  # torch warns that it cannot write to a read-only array: by design
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw).view(array.dtype).view(array.shape)


def check_sizes(folder: Path, manifest: dict) -> None:
    """Raise CacheCorruptError when a file is missing or its size does not match the manifest."""
    for array in arrays(manifest):
        path = safe_path(folder, array.file)
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


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _journal_entries(payload: object, path: Path, n: int | None, views: int | None) -> list:
    """The chunk entries of a journal file, each checked to be ``[view, start, count, {file: crc32}]``
    within the cache's bounds."""
    def bad(why: str) -> CacheCorruptError:
        return CacheCorruptError(f"{path} is not a valid journal ({why}); remove the cache and rebuild it.")

    if not isinstance(payload, dict) or not isinstance(payload.get("chunks", []), list):
        raise bad("expected an object with a list of chunks")
    entries = payload.get("chunks", [])
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise bad(f"entry {entry!r:.80} is not [view, start, count, checksums]")
        view, start, count, sums = entry
        if not (_is_int(view) and _is_int(start) and _is_int(count) and view >= 0 and start >= 0 and count >= 1):
            raise bad(f"entry {entry!r:.80} has a bad view, start or count")
        if (n is not None and start + count > n) or (views is not None and view >= views):
            raise bad(f"chunk (view {view}, samples {start}..{start + count - 1}) is outside the cache")
        if not (isinstance(sums, dict) and all(isinstance(k, str) and _is_int(v) for k, v in sums.items())):
            raise bad(f"entry {entry!r:.80} has bad checksums")
    return entries


_TAP_DTYPES = ("float32", "bfloat16", "float16", "int8")
_MAX_BYTES = 1 << 50  # no real cache file is a petabyte; larger sizes are corruption


def validate_manifest(manifest: object, folder: Path) -> dict:
    """``manifest`` checked field by field (types, ranges, dtypes, safe file names), so that
    nothing read from a cache folder can be misread as a layout; CacheCorruptError naming the
    first bad field otherwise. Returns the manifest."""
    def bad(why: str) -> CacheCorruptError:
        return CacheCorruptError(f"cache {folder.name}: invalid manifest ({why}); remove the cache and rebuild it.")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    from fastft.cache.fingerprint import FORMAT_VERSION

    version = manifest.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        older = _is_int(version) and version < FORMAT_VERSION
        raise CacheCorruptError(
            f"cache {folder.name} has format version {version!r}, this fastft reads version {FORMAT_VERSION}"
            + (" (an older fastft wrote it)" if older else " (a newer fastft wrote it)" if _is_int(version) else "")
            + "; it is never read. Building the same cache again replaces it; or remove it."
        )
    if not isinstance(manifest.get("fingerprint"), str) or not manifest["fingerprint"]:
        raise bad("no fingerprint")
    parts = manifest.get("parts")
    if not (isinstance(parts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in parts.items())):
        raise bad("parts must map names to strings")
    created = manifest.get("created", 0.0)
    if not ((_is_int(created) and abs(created) < 2**53) or (isinstance(created, float) and abs(created) < float("inf"))):
        raise bad("created must be a time in seconds")  # list() sorts by it
    if manifest.get("status") not in ("building", "complete"):
        raise bad(f"status {manifest.get('status')!r:.40}")
    n, k = manifest.get("num_rows"), manifest.get("num_views")
    if not (_is_int(n) and _is_int(k) and n >= 1 and k >= 1):
        raise bad("num_rows and num_views must be positive integers")
    taps = manifest.get("taps")
    if not (isinstance(taps, list) and taps and all(isinstance(t, dict) for t in taps)):
        raise bad("taps must be a non-empty list of objects")
    names, files = set(), []
    for tap in taps:
        name, dim, shape = tap.get("name"), tap.get("dim"), tap.get("shape")
        if not isinstance(name, str) or name in names or name == "labels" or name.endswith(".scales"):
            raise bad(f"tap name {name!r:.40}")
        names.add(name)
        if not (_is_int(dim) and dim >= 1 and isinstance(shape, list) and all(_is_int(d) and d >= 1 for d in shape)
                and int(np.prod(shape, dtype=object)) == dim):
            raise bad(f"tap {name!r:.40}: dim {dim!r:.20} and shape {shape!r:.40} do not agree")
        if tap.get("dtype") not in _TAP_DTYPES:
            raise bad(f"tap {name!r:.40}: storage dtype {tap.get('dtype')!r:.20}")
        if not isinstance(tap.get("pool"), str):
            raise bad(f"tap {name!r:.40}: pool")
        if n * k * dim * 4 > _MAX_BYTES:
            raise bad(f"tap {name!r:.40}: {n} x {k} x {dim} rows is not a real size")
        files.append(tap.get("file"))
        if (tap.get("dtype") == "int8") != (tap.get("scales_file") is not None):
            raise bad(f"tap {name!r:.40}: an int8 tap and only an int8 tap has a scales file")
        if tap.get("scales_file") is not None:
            files.append(tap["scales_file"])
    labels = manifest.get("labels")
    if not isinstance(labels, dict):
        raise bad("no labels")
    str_to_dtype(labels.get("dtype"))
    shape = labels.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
            and n * int(np.prod(shape, dtype=object)) * 16 <= _MAX_BYTES):
        raise bad(f"labels shape {shape!r:.40}")
    files.append(labels.get("file"))
    for name in files:
        safe_path(folder, name)
    if len(set(files)) != len(files):
        raise bad("two arrays share one file")
    return manifest


def shard_journals(folder: Path) -> list[Path]:
    """The rank journals of a sharded build in ``folder``, by rank."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _SHARD_JOURNAL_RE.fullmatch(path.name)
        if match and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def remove_journals(folder: Path) -> None:
    """Forget every committed chunk of ``folder`` (``journal.json`` and the rank journals)."""
    for path in [folder / JOURNAL, *shard_journals(folder)]:
        path.unlink(missing_ok=True)


class Journal:
    """The set of committed chunks: ``(view, start) -> (count, {file: crc32})``."""

    def __init__(self, folder: Path, n: int | None = None, views: int | None = None, *,
                 shard: int | None = None):
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
            for view, start, count, sums in _journal_entries(read_json(self.path), self.path, n, views):
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
            + "; the bytes on disk were changed after they were written. Remove the cache and rebuild it."
        )
    complete = journal.covers(n, manifest["num_views"])
    if manifest.get("status") == "complete" and not complete:
        raise CacheCorruptError(f"cache {folder.name}: marked complete but its journal does not cover every row.")
    return {"fingerprint": manifest["fingerprint"], "path": str(folder), "chunks": len(journal.chunks),
            "complete": complete, "ok": True}


def read_manifest(folder: Path) -> dict:
    """The validated manifest of a cache folder (:func:`validate_manifest`); CacheError when
    there is none, CacheCorruptError when it is unreadable, invalid or of another format version."""
    try:
        manifest = read_json(folder / MANIFEST)
    except FileNotFoundError:
        raise CacheError(f"{folder} is not a fastft cache (no {MANIFEST}).") from None
    return validate_manifest(manifest, folder)


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
    if locks.is_symlink():
        raise CacheError(f"{locks} is a symbolic link; fastft never follows links for its locks. Remove it.")
    try:  # O_NOFOLLOW: a link planted at the lock's name must not make fastft create its target
        fd = os.open(locks / f"{fingerprint}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"the lock file {locks / (fingerprint + '.lock')} is a symbolic link; fastft never "
                             "follows links for its locks. Remove it.") from None
        raise
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


def is_being_built(cache_dir: Path, fingerprint: str) -> bool:
    """True while a process holds the build lock of ``fingerprint`` (never waits)."""
    path = cache_dir / LOCKS / f"{fingerprint}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- write errors
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def write_errors(folder: Path, what: str, *, committed_rows: int | None = None) -> Iterator[None]:
    """Turn an OSError while writing a cache (disk full, quota, file size limit, permissions)
    into a CacheError that says what to do; what is committed stays committed, so building
    again resumes."""
    try:
        yield
    except OSError as exc:
        kept = (f"The {committed_rows} rows committed so far are kept: building again resumes from them."
                if committed_rows else "Building again starts or resumes it.")
        if exc.errno in _NO_SPACE:
            why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EFBIG: "the file size limit was reached"}[exc.errno]
            raise CacheError(
                f"cache {folder.name}: {why} while {what} in {folder.parent} ({exc.strerror}). Free disk "
                f"space there, or pass cache_dir= (or set FASTFT_CACHE_DIR) to a disk with room. {kept}"
            ) from exc
        raise CacheError(f"cache {folder.name}: cannot write {folder} while {what} ({exc}). {kept}") from exc


# ---------------------------------------------------------------------------- folders
def ensure_real_folder(folder: Path) -> None:
    """CacheError when a cache folder is a symbolic link (fastft never writes through one)."""
    if folder.is_symlink():
        raise CacheError(f"{folder} is a symbolic link; fastft never reads or writes a cache through a link. "
                         "Remove the link.")


def discard_folder(folder: Path) -> None:
    """Delete a folder of the cache dir that the builder found unusable (corrupt, an
    interrupted build of other settings, a layout that does not match), to build it again:
    like :func:`remove_folder`, only fastft's files, never through a link."""
    remove_folder(folder, missing_ok=True)


#: Names fastft gives the files of a cache folder (whatever its manifest says, or if it has none).
_OWN_NAME = re.compile(r"(manifest\.json|journal(\.rank\d{1,6})?\.json|tap\d+(\.scales)?\.bin|labels\.bin)(\.tmp)?")


def owned_files(folder: Path, manifest: dict | None) -> set[str]:
    """The names fastft writes in a cache folder: the manifest, the journals, the files the
    manifest names or that fastft names so, and the temporary files of their atomic rewrites."""
    names = {p.name for p in folder.iterdir() if _OWN_NAME.fullmatch(p.name)} if folder.is_dir() else set()
    names |= {MANIFEST, JOURNAL}
    if manifest is not None:
        names |= {a.file for a in arrays(manifest)}
    names |= {n + ".tmp" for n in list(names)}
    return names


def remove_folder(folder: Path, *, missing_ok: bool = False) -> None:
    """Delete a cache folder that fastft wrote: only the files it writes, then the folder.

    Refuses (CacheError) a link, or a folder that holds anything else (it is not a cache, or
    someone put files there), so that no path given by mistake loses data.
    """
    if not folder.exists() and not folder.is_symlink():
        if missing_ok:
            return
        raise CacheError(f"{folder} does not exist.")
    ensure_real_folder(folder)
    try:
        manifest = read_manifest(folder)
    except CacheError:
        manifest = None  # unreadable: only the names fastft gives its files then
    except FileNotFoundError:
        return
    known = owned_files(folder, manifest)
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return
    strangers = [p.name for p in entries if p.name not in known or p.is_dir() and not p.is_symlink()]
    if strangers:
        raise CacheError(
            f"{folder} holds files fastft did not write ({', '.join(sorted(strangers)[:5])}"
            f"{', ...' if len(strangers) > 5 else ''}); not removing it. Delete it yourself if you are sure."
        )
    for p in entries:
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass


def check_free_space(folder: Path, nbytes: int) -> None:
    """CacheTooLargeError when the disk holding ``folder`` has less than ``nbytes`` free."""
    from fastft.cache.storage import format_gib
    from fastft.errors import CacheTooLargeError

    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise CacheTooLargeError(
            f"the disk is full for this cache: it needs {format_gib(nbytes)} ({nbytes:,} bytes) but {probe} has "
            f"{format_gib(free)} free. Free space there, pass cache_dir= (or set FASTFT_CACHE_DIR) to a disk "
            "with room, or make the cache smaller (a smaller cache_dtype, fewer views or samples)."
        )


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
        """CacheCorruptError unless every chunk holding one of the physical ``rows`` matches its checksums."""
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
            bad += [f"{f} (view {view}, samples {start}..{start + count - 1})"
                    for f, crc in actual.items() if sums.get(f) != crc]
            if bad:
                break
        if bad:
            raise CacheCorruptError(
                f"cache {self.folder.name}: checksum mismatch in {', '.join(bad)}; the bytes on disk changed "
                "after they were written. Its features are not used: remove the cache (fastft cache rm "
                f"{self.folder.name[:12]}) and build it again."
            )
