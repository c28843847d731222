"""Cache folders on disk: the build lock, write errors that say what to do, removing only
what fastft wrote, the free-space check."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastft.cache.disk import JOURNAL, LOCKS, MANIFEST, arrays, read_manifest
from fastft.errors import CacheError, CacheLockedError

# ---------------------------------------------------------------------------- lock
#: Longest wait for another process's build of the same cache (seconds);
#: FASTFT_LOCK_TIMEOUT overrides.
LOCK_TIMEOUT_S = 6 * 3600.0


@contextmanager
def build_lock(
    cache_dir: Path, fingerprint: str, *, timeout: float | None = None, on_wait=None
) -> Iterator[None]:
    """Hold the exclusive build lock of ``fingerprint``; wait (polling) while another process
    holds it. The kernel drops an flock when its holder dies, so a killed builder never
    leaves a stale lock. Raises CacheLockedError after ``timeout`` seconds."""
    if timeout is None:
        timeout = float(os.environ.get("FASTFT_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    locks = cache_dir / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    if locks.is_symlink():
        raise CacheError(
            f"{locks} is a symbolic link; fastft never follows links for its locks. Remove it."
        )
    try:  # O_NOFOLLOW: a link planted at the lock's name must not make fastft create its target
        fd = os.open(locks / f"{fingerprint}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(
                f"the lock file {locks / (fingerprint + '.lock')} is a symbolic link; fastft never "
                "follows links for its locks. Remove it."
            ) from None
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


def mark_used(folder: Path) -> None:
    """Record that a disk cache was just used (its manifest's modification time, which
    ``fastft cache prune`` reads as the last use); a read-only cache dir is left as it is."""
    try:
        os.utime(folder / MANIFEST, follow_symlinks=False)
    except OSError:
        pass


def last_used(folder: Path, created: float = 0.0) -> float:
    """When a disk cache was last built or reused (see :func:`mark_used`; ``created`` when its
    manifest cannot be read)."""
    try:
        return (folder / MANIFEST).lstat().st_mtime
    except OSError:
        return float(created or 0.0)


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
        kept = (
            f"The {committed_rows} rows committed so far are kept: building again resumes from "
            "them."
            if committed_rows
            else "Building again starts or resumes it."
        )
        if exc.errno in _NO_SPACE:
            why = {
                errno.ENOSPC: "the disk is full",
                errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file size limit was reached",
            }[exc.errno]
            raise CacheError(
                f"cache {folder.name}: {why} while {what} in {folder.parent} ({exc.strerror}). "
                "Free disk space there, or pass cache_dir= (or set FASTFT_CACHE_DIR) to a disk "
                f"with room. {kept}"
            ) from exc
        raise CacheError(
            f"cache {folder.name}: cannot write {folder} while {what} ({exc}). {kept}"
        ) from exc


# ---------------------------------------------------------------------------- folders
def ensure_real_folder(folder: Path) -> None:
    """CacheError when a cache folder is a symbolic link (fastft never writes through one)."""
    if folder.is_symlink():
        raise CacheError(
            f"{folder} is a symbolic link; fastft never reads or writes a cache through a link. "
            "Remove the link."
        )


def discard_folder(folder: Path) -> None:
    """Delete a folder of the cache dir that the builder found unusable (corrupt, an
    interrupted build of other settings, a layout that does not match), to build it again:
    like :func:`remove_folder`, only fastft's files, never through a link."""
    remove_folder(folder, missing_ok=True)


#: Names fastft gives the files of a cache folder (whatever its manifest says, or if it has none).
_OWN_NAME = re.compile(
    r"(manifest\.json|journal(\.rank\d{1,6})?\.json|tap\d+(\.scales)?\.bin|labels\.bin)(\.tmp)?"
)


def owned_files(folder: Path, manifest: dict | None) -> set[str]:
    """The names fastft writes in a cache folder: the manifest, the journals, the files the
    manifest names or that fastft names so, and the temporary files of their atomic rewrites."""
    names = (
        {p.name for p in folder.iterdir() if _OWN_NAME.fullmatch(p.name)}
        if folder.is_dir()
        else set()
    )
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
    strangers = [
        p.name for p in entries if p.name not in known or p.is_dir() and not p.is_symlink()
    ]
    if strangers:
        raise CacheError(
            f"{folder} holds files fastft did not write "
            f"({', '.join(sorted(strangers)[:5])}{', ...' if len(strangers) > 5 else ''}); not "
            "removing it. Delete it yourself if you are sure."
        )
    for p in entries:
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass


def check_free_space(folder: Path, nbytes: int) -> None:
    """CacheTooLargeError when the disk holding ``folder`` has less than ``nbytes`` free."""
    from fastft.cache.layout import format_gib
    from fastft.errors import CacheTooLargeError

    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise CacheTooLargeError(
            f"the disk is full for this cache: it needs {format_gib(nbytes)} ({nbytes:,} bytes) "
            f"but {probe} has {format_gib(free)} free. Free space there, pass cache_dir= (or set "
            "FASTFT_CACHE_DIR) to a disk with room, or make the cache smaller (a smaller "
            "cache_dtype, fewer views or samples)."
        )
