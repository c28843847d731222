"""Finding, listing, checking and removing disk caches (what ``fastft cache …`` serves).

A cache is named by its fingerprint (or a unique prefix of one) and looked up in the cache
dir; only an argument that is written as a path (a ``Path`` object, or a string holding a
``/`` or starting with ``.`` or ``~``) is taken as a folder, so a folder of the working
directory never shadows a cache of the same name. Removal deletes only what fastft owns:
a folder whose manifest is a valid fastft manifest naming that folder's own fingerprint,
holding no files fastft did not write, never ``.``, the cache dir or a folder above it,
never through a link, and never while a process builds it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastft.cache import disk, folders, journal
from fastft.errors import CacheError, CacheLockedError

__all__ = ["default_cache_dir", "cache_root", "resolve", "info", "list_caches", "verify", "remove"]


def default_cache_dir() -> Path:
    """``$FASTFT_CACHE_DIR`` when set, else ``~/.cache/fastft``."""
    env = os.environ.get("FASTFT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastft"


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def is_path(argument: str | Path) -> bool:
    """Whether a cache argument is written as a path rather than a fingerprint."""
    if isinstance(argument, Path):
        return True
    text = str(argument)
    return "/" in text or os.sep in text or text.startswith((".", "~"))


def resolve(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder of a cache given as a fingerprint (or a unique prefix of one) in the cache
    dir, or as a path (see :func:`is_path`)."""
    if is_path(fingerprint_or_path):
        folder = Path(fingerprint_or_path).expanduser()
        if not (folder / disk.MANIFEST).is_file():
            raise CacheError(f"{folder} is not a fastft cache folder (no {disk.MANIFEST}).")
        return folder
    root = cache_root(cache_dir)
    key = str(fingerprint_or_path)
    try:
        if key and (root / key / disk.MANIFEST).is_file():
            return root / key
    except OSError:  # a name the filesystem refuses (too long): no such cache
        raise CacheError(f"no fastft cache {key[:80]!r} in {root}.") from None
    # A prefix of a fingerprint: compared by name, never used as a glob.
    matches = []
    if key and root.is_dir():
        for p in root.iterdir():
            try:
                if p.name.startswith(key) and (p / disk.MANIFEST).is_file():
                    matches.append(p)
            except OSError:  # removed meanwhile
                continue
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CacheError(
            f"{key!r} matches {len(matches)} caches in {root}; give more of the fingerprint."
        )
    raise CacheError(
        f"no fastft cache {key!r} in {root} (a folder elsewhere is given as a path: ./{key})."
    )


def _folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.iterdir():
        try:
            if p.is_file():
                total += p.stat().st_blocks * 512
        except FileNotFoundError:  # a temporary file renamed or removed meanwhile
            continue
    return total


def info(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> dict:
    """The manifest of a disk cache plus its path, status and bytes used on disk."""
    folder = resolve(fingerprint_or_path, cache_dir)
    try:
        manifest = disk.read_manifest(folder)
        committed = journal.Journal(folder, manifest["num_rows"], manifest["num_views"])
        out = dict(manifest)
        out.update(
            {
                "path": str(folder),
                "disk_bytes": _folder_bytes(folder),
                "committed_chunks": len(committed.chunks),
                "reusable": "once" not in manifest["parts"],
            }
        )
    except FileNotFoundError:
        raise CacheError(f"cache {folder.name} was removed while it was being read.") from None
    return out


def list_caches(cache_dir: str | Path | None = None) -> list[dict]:
    """Info dicts of every cache under ``cache_dir``, newest first (unreadable ones say so;
    a cache removed while the list is made is left out)."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        try:
            if not (folder / disk.MANIFEST).is_file():
                continue
            out.append(info(folder))
        except CacheError as exc:
            if folder.exists():
                out.append(
                    {
                        "fingerprint": folder.name,
                        "path": str(folder),
                        "status": "unreadable",
                        "error": str(exc),
                    }
                )
    return sorted(out, key=lambda d: d.get("created", 0), reverse=True)


def verify(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Check sizes and every chunk checksum; raises CacheCorruptError on a mismatch."""
    folder = resolve(fingerprint_or_path, cache_dir)
    try:
        return journal.verify_folder(folder)
    except FileNotFoundError:
        raise CacheError(f"cache {folder.name} was removed while it was being checked.") from None


def _refuse(folder: Path, why: str) -> CacheError:
    return CacheError(f"not removing {folder}: {why}.")


def check_removable(folder: Path, cache_dir: str | Path | None = None) -> None:
    """CacheError unless ``folder`` is a fastft cache that may be deleted (see the module
    docstring)."""
    if folder.is_symlink():
        raise _refuse(folder, "it is a symbolic link (fastft never deletes through a link)")
    real = folder.resolve()
    for protected, what in (
        (Path.cwd().resolve(), "the working directory"),
        (cache_root(cache_dir).resolve(), "the cache dir"),
        (Path.home().resolve(), "home"),
    ):
        if real == protected or real in protected.parents:
            raise _refuse(folder, f"it is {what} or a folder above it")
    try:
        manifest = disk.read_manifest(folder)
    except CacheError as exc:
        raise _refuse(folder, f"it holds no valid fastft manifest ({exc})") from None
    if manifest["fingerprint"] != folder.name:
        raise _refuse(
            folder,
            f"its manifest names cache {manifest['fingerprint'][:12]}, not the folder's name "
            "(a fastft cache folder is named by its fingerprint)",
        )


def remove(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Delete a disk cache, only if fastft owns it (see the module docstring); refuses
    (CacheLockedError) while a process is building it."""
    folder = resolve(fingerprint_or_path, cache_dir)
    check_removable(folder, cache_dir)
    locks = folder.parent / disk.LOCKS
    had_locks = locks.exists()
    try:
        with folders.build_lock(folder.parent, folder.name, timeout=0):
            folders.remove_folder(folder)
    except CacheLockedError:
        raise CacheLockedError(
            f"cache {folder.name} is being built by another process; remove it later."
        ) from None
    finally:
        if not had_locks:  # leave a folder outside the cache dir as it was
            (locks / f"{folder.name}.lock").unlink(missing_ok=True)
            try:
                locks.rmdir()
            except OSError:
                pass
    return folder
