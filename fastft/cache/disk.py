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
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastft.cache.layout import str_dtype
from fastft.errors import CacheCorruptError, CacheError

#: Bump when the on-disk layout or the meaning of stored bytes or keys changes.
FORMAT_VERSION = 2

MANIFEST = "manifest.json"
JOURNAL = "journal.json"
#: A rank's own journal during a sharded build (see :class:`Journal`).
SHARD_JOURNAL = "journal.rank{}.json"
SHARD_JOURNAL_RE = re.compile(r"journal\.rank(\d{1,6})\.json")
LOCKS = ".locks"


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
    with open(tmp, "w", opener=lambda name, flags: open_nofollow(Path(name), flags)) as f:
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
        raise CacheCorruptError(
            f"{path} cannot be read as JSON ({exc}); remove the cache and rebuild it."
        ) from exc


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
        dtype = str_dtype(tap["dtype"])
        out.append(Array(tap["name"], tap["file"], dtype, (n * k, tap["dim"]), True))
        if tap.get("scales_file"):
            out.append(
                Array(tap["name"] + ".scales", tap["scales_file"], torch.float32, (n * k,), True)
            )
    labels = manifest["labels"]
    out.append(
        Array("labels", labels["file"], str_dtype(labels["dtype"]), (n, *labels["shape"]), False)
    )
    return out


#: What a file name in a manifest may look like: one plain name inside the cache folder (no
#: separators, no ``..``, not absolute), so a manifest can never make fastft read or write
#: outside its folder.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def safe_path(folder: Path, name: object) -> Path:
    """``folder / name`` for a file name taken from a manifest; CacheCorruptError unless it is a
    plain file name of this folder (path traversal, absolute paths, links are refused)."""
    if (
        not isinstance(name, str)
        or not _SAFE_NAME.fullmatch(name)
        or name in (MANIFEST, JOURNAL)
        or SHARD_JOURNAL_RE.fullmatch(name)
    ):
        raise CacheCorruptError(
            f"cache {folder.name}: the manifest names the file {name!r}, which is not a plain file "
            "name of the cache folder; refusing to use it. Remove the cache and rebuild it."
        )
    path = folder / name
    if path.is_symlink():
        raise CacheCorruptError(
            f"cache {folder.name}: {name} is a symbolic link; fastft never follows links in a "
            "cache folder. Remove the cache and rebuild it."
        )
    return path


def open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link put there after safe_path looked
            raise CacheCorruptError(
                f"{path} is a symbolic link; fastft never follows links in a cache folder."
            ) from None
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


def map_array(
    folder: Path, array: Array, *, create: bool = False, writable: bool = True
) -> torch.Tensor:
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
    fd = open_nofollow(path, flags)
    with os.fdopen(fd, "r+b" if writable or create else "rb") as f:
        if create:
            _allocate(f.fileno(), array.nbytes)
        if array.nbytes == 0:
            return torch.empty(array.shape, dtype=array.dtype)
        raw = np.memmap(
            f, dtype=np.uint8, mode="r+" if writable or create else "r", shape=(array.nbytes,)
        )
    if raw.flags.writeable:
        return torch.from_numpy(raw).view(array.dtype).view(array.shape)
    with (
        warnings.catch_warnings()
    ):  # torch warns that it cannot write to a read-only array: by design
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw).view(array.dtype).view(array.shape)


def check_sizes(folder: Path, manifest: dict) -> None:
    """Raise CacheCorruptError when a file is missing or its size does not match the manifest."""
    for array in arrays(manifest):
        path = safe_path(folder, array.file)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheCorruptError(
                f"cache {folder.name}: {array.file} is missing; remove the cache and rebuild it."
            ) from None
        if size != array.nbytes:
            raise CacheCorruptError(
                f"cache {folder.name}: {array.file} has {size} bytes but the manifest expects "
                f"{array.nbytes} (truncated or overwritten); remove the cache and rebuild it."
            )


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_TAP_DTYPES = ("float32", "bfloat16", "float16", "int8")
_MAX_BYTES = 1 << 50  # no real cache file is a petabyte; larger sizes are corruption


def validate_manifest(manifest: object, folder: Path) -> dict:
    """``manifest`` checked field by field (types, ranges, dtypes, safe file names), so that
    nothing read from a cache folder can be misread as a layout; CacheCorruptError naming the
    first bad field otherwise. Returns the manifest."""

    def bad(why: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"cache {folder.name}: invalid manifest ({why}); remove the cache and rebuild it."
        )

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        older = is_int(version) and version < FORMAT_VERSION
        raise CacheCorruptError(
            f"cache {folder.name} has format version {version!r}, this fastft reads version "
            f"{FORMAT_VERSION}"
            + (
                " (an older fastft wrote it)"
                if older
                else " (a newer fastft wrote it)"
                if is_int(version)
                else ""
            )
            + "; it is never read. Building the same cache again replaces it; or remove it."
        )
    if not isinstance(manifest.get("fingerprint"), str) or not manifest["fingerprint"]:
        raise bad("no fingerprint")
    parts = manifest.get("parts")
    if not (
        isinstance(parts, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in parts.items())
    ):
        raise bad("parts must map names to strings")
    created = manifest.get("created", 0.0)
    if not (
        (is_int(created) and abs(created) < 2**53)
        or (isinstance(created, float) and abs(created) < float("inf"))
    ):
        raise bad("created must be a time in seconds")  # list() sorts by it
    if manifest.get("status") not in ("building", "complete"):
        raise bad(f"status {manifest.get('status')!r:.40}")
    n, k = manifest.get("num_rows"), manifest.get("num_views")
    if not (is_int(n) and is_int(k) and n >= 1 and k >= 1):
        raise bad("num_rows and num_views must be positive integers")
    taps = manifest.get("taps")
    if not (isinstance(taps, list) and taps and all(isinstance(t, dict) for t in taps)):
        raise bad("taps must be a non-empty list of objects")
    names, files = set(), []
    for tap in taps:
        name, dim, shape = tap.get("name"), tap.get("dim"), tap.get("shape")
        if (
            not isinstance(name, str)
            or name in names
            or name == "labels"
            or name.endswith(".scales")
        ):
            raise bad(f"tap name {name!r:.40}")
        names.add(name)
        if not (
            is_int(dim)
            and dim >= 1
            and isinstance(shape, list)
            and all(is_int(d) and d >= 1 for d in shape)
            and int(np.prod(shape, dtype=object)) == dim
        ):
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
    str_dtype(labels.get("dtype"))
    shape = labels.get("shape")
    if not (
        isinstance(shape, list)
        and all(is_int(d) and d >= 0 for d in shape)
        and n * int(np.prod(shape, dtype=object)) * 16 <= _MAX_BYTES
    ):
        raise bad(f"labels shape {shape!r:.40}")
    files.append(labels.get("file"))
    for name in files:
        safe_path(folder, name)
    if len(set(files)) != len(files):
        raise bad("two arrays share one file")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The validated manifest of a cache folder (:func:`validate_manifest`); CacheError when
    there is none, CacheCorruptError when it is unreadable, invalid or of another format version."""
    try:
        manifest = read_json(folder / MANIFEST)
    except FileNotFoundError:
        raise CacheError(f"{folder} is not a fastft cache (no {MANIFEST}).") from None
    return validate_manifest(manifest, folder)
