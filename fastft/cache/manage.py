"""Finding, listing, checking and removing disk caches (what ``fastft cache …`` serves)."""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

from fastft.cache import disk
from fastft.errors import CacheError, CacheLockedError


def default_cache_dir() -> Path:
    """``$FASTFT_CACHE_DIR`` when set, else ``~/.cache/fastft``."""
    env = os.environ.get("FASTFT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastft"


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def resolve(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder of a cache given as a folder path, a fingerprint or a unique prefix of one."""
    candidate = Path(fingerprint_or_path).expanduser()
    if (candidate / disk.MANIFEST).is_file():
        return candidate
    root = cache_root(cache_dir)
    key = str(fingerprint_or_path)
    if (root / key / disk.MANIFEST).is_file():
        return root / key
    # A prefix of a fingerprint: compared by name, never used as a glob or a path ('/', '..',
    # '[' would otherwise escape the folder or raise).
    plain = bool(key) and "/" not in key and os.sep not in key and not key.startswith(".")
    matches = ([p for p in root.iterdir() if p.name.startswith(key) and (p / disk.MANIFEST).is_file()]
               if plain and root.is_dir() else [])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CacheError(f"{key!r} matches {len(matches)} caches in {root}; give more of the fingerprint.")
    raise CacheError(f"no fastft cache {key!r} (looked for a folder and in {root}).")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


def info(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> dict:
    """The manifest of a disk cache plus its path, status and bytes used on disk."""
    folder = resolve(fingerprint_or_path, cache_dir)
    manifest = disk.read_manifest(folder)
    journal = disk.Journal(folder, manifest["num_rows"], manifest["num_views"])
    out = dict(manifest)
    out.update({"path": str(folder), "disk_bytes": _folder_bytes(folder),
                "committed_chunks": len(journal.chunks)})
    return out


def list(cache_dir: str | Path | None = None) -> builtins.list[dict]:  # noqa: A001 (the CLI's verb)
    """Info dicts of every cache under ``cache_dir``, newest first (unreadable ones say so)."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        if not (folder / disk.MANIFEST).is_file():
            continue
        try:
            out.append(info(folder))
        except CacheError as exc:
            out.append({"fingerprint": folder.name, "path": str(folder), "status": "unreadable", "error": str(exc)})
    return sorted(out, key=lambda d: d.get("created", 0), reverse=True)


def verify(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Check sizes and every chunk checksum; raises CacheCorruptError on a mismatch."""
    return disk.verify_folder(resolve(fingerprint_or_path, cache_dir))


def remove(fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Delete a disk cache; refuses (CacheLockedError) while a process is building it."""
    folder = resolve(fingerprint_or_path, cache_dir)
    try:
        with disk.build_lock(folder.parent, folder.name, timeout=0):
            shutil.rmtree(folder)
    except CacheLockedError:
        raise CacheLockedError(f"cache {folder.name} is being built by another process; remove it later.") from None
    return folder
