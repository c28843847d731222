"""Finding, listing, checking and removing disk caches (what ``fastft cache …`` serves).

A cache is named by its fingerprint (or a unique prefix of one) and looked up in the cache
dir; only an argument that is written as a path (a ``Path`` object, or a string holding a
``/`` or starting with ``.`` or ``~``) is taken as a folder, so a folder of the working
directory never shadows a cache of the same name. Removal deletes only what fastft owns:
a folder whose manifest is a valid fastft manifest naming that folder's own fingerprint,
holding no files fastft did not write, never ``.``, the cache dir or a folder above it,
never through a link, and never while a process builds it.

:func:`prune` removes, by those same rules, the caches that will not be used again: the ones
superseded by a newer cache of the same model and data (see :data:`SUPERSEDING`), and on
request the ones unused for some days or the least recently used beyond a size. A size cap
in ``$FASTFT_CACHE_MAX_SIZE`` (e.g. ``20G``) applies it after every disk build
(:func:`apply_size_cap`), never to a cache this process uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from fastft.cache import disk, folders, journal
from fastft.cache.fingerprint import changed_parts, describe_changes
from fastft.cache.layout import parse_bytes
from fastft.cache.telemetry import log, size_text
from fastft.errors import CacheError, CacheLockedError, FastFTValueError

__all__ = [
    "default_cache_dir",
    "cache_root",
    "resolve",
    "info",
    "list_caches",
    "verify",
    "remove",
    "prune",
    "apply_size_cap",
]


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
    """The manifest of a disk cache plus its path, status and bytes used on disk.

    Args:
        fingerprint_or_path: a cache's fingerprint (or a unique prefix of one) in
            ``cache_dir``, or its folder (a ``Path``, or a string with a ``/``).
        cache_dir: the caches' folder (default ``$FASTFT_CACHE_DIR`` or
            ``~/.cache/fastft``).
    """
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
                "complete": manifest.get("status") == "complete",
                "being_built": folders.is_being_built(folder.parent, folder.name),
                "reusable": "once" not in manifest["parts"],
                "last_used": folders.last_used(folder, manifest.get("created", 0.0)),
            }
        )
    except FileNotFoundError:
        raise CacheError(f"cache {folder.name} was removed while it was being read.") from None
    return out


def list_caches(cache_dir: str | Path | None = None) -> list[dict]:
    """Info dicts of every cache under ``cache_dir``, newest first (unreadable ones say so;
    a cache removed while the list is made is left out).

    Args:
        cache_dir: the caches' folder (default ``$FASTFT_CACHE_DIR`` or
            ``~/.cache/fastft``).
    """
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
    """Check sizes and every chunk checksum; raises CacheCorruptError on a mismatch.

    Args:
        fingerprint_or_path: a cache's fingerprint (or a unique prefix of one) in
            ``cache_dir``, or its folder (a ``Path``, or a string with a ``/``).
        cache_dir: the caches' folder (default ``$FASTFT_CACHE_DIR`` or
            ``~/.cache/fastft``).
    """
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
    (CacheLockedError) while a process is building it.

    Args:
        fingerprint_or_path: a cache's fingerprint (or a unique prefix of one) in
            ``cache_dir``, or its folder (a ``Path``, or a string with a ``/``).
        cache_dir: the caches' folder (default ``$FASTFT_CACHE_DIR`` or
            ``~/.cache/fastft``).
    """
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


# ---------------------------------------------------------------------------- prune
#: The key parts in which a newer cache *supersedes* an older one of the same model and data:
#: the frozen weights (the model was trained further, or another checkpoint loaded) and the
#: cache format (fastft was upgraded). Caches that differ in anything else (the cut, the
#: frozen modules' code, the data, the transform, views, dtype, device kind, pooling) are
#: different caches, all kept.
SUPERSEDING = ("weights", "format")

#: The size cap applied after every disk build (see :func:`apply_size_cap`).
SIZE_CAP_ENV = "FASTFT_CACHE_MAX_SIZE"


def lineage(parts: dict) -> tuple | None:
    """What a cache is a cache *of*: its key's parts but the superseding ones; None for a
    cache that can never be reused (built for one use only)."""
    if "once" in parts:
        return None
    return tuple(sorted((k, str(v)) for k, v in parts.items() if k not in SUPERSEDING))


def parse_size(size: int | str, what: str = "--max-size") -> int:
    """A size in bytes from a number or a string like ``'20G'``, ``'512MB'``, ``'2GiB'``."""
    try:
        nbytes = parse_bytes(size)
    except FastFTValueError:
        nbytes = None
    if nbytes is None or nbytes < 0:
        raise FastFTValueError(f"cannot read {what}={size!r}; use bytes or e.g. '20G', '2GiB'.")
    return nbytes


def _superseded(entries: list[dict]) -> dict[str, str]:
    """fingerprint → why, for the caches a newer one of the same lineage supersedes
    (``entries`` newest first), and those that can never be reused."""
    newest: dict[tuple, dict] = {}
    why = {}
    for e in entries:
        line = lineage(e["parts"])
        if line is None:
            why[e["fingerprint"]] = "it can never be reused (built for one use only)"
        elif line in newest:
            new = newest[line]
            changed = describe_changes(changed_parts(e["parts"], new["parts"]))
            why[e["fingerprint"]] = f"superseded by {new['fingerprint'][:12]} ({changed} changed)"
        else:
            newest[line] = e
    return why


def prune(
    cache_dir: str | Path | None = None,
    *,
    superseded: bool = True,
    older_than_days: float | None = None,
    max_size: int | str | None = None,
    dry_run: bool = False,
    keep: Iterable[str] = (),
) -> list[dict]:
    """Remove the disk caches that will not be used again, with :func:`remove`'s rules (a
    cache being built is never removed).

    Args:
        cache_dir: the caches' folder (default ``$FASTFT_CACHE_DIR`` or
            ``~/.cache/fastft``).
        superseded: remove the caches a newer one of the same model and data supersedes
            (see :data:`SUPERSEDING`) and those built for one use only (default True).
        older_than_days: also those not built or reused for that many days (default None).
        max_size: bytes, or e.g. ``'20G'``: then the least recently used, until all of them
            take at most that much disk (default None: no cap).
        dry_run: remove nothing, say what would be removed (default False).
        keep: fingerprints never removed (the caches in use); default none.

    Returns:
        The caches chosen, each :func:`info`'s dict plus ``why`` it was chosen, ``removed``
        (bool) and, when it was not removed, ``skipped`` (why not).
    """
    root = cache_root(cache_dir)
    cap = None if max_size is None else parse_size(max_size)
    entries = [e for e in list_caches(root) if e.get("status") != "unreadable"]
    protected = set(keep) | {
        e["fingerprint"] for e in entries if folders.is_being_built(root, e["fingerprint"])
    }
    chosen = _superseded(entries) if superseded else {}
    if older_than_days is not None:
        now = time.time()
        for e in entries:
            days = (now - e["last_used"]) / 86400
            if days > older_than_days:
                chosen.setdefault(e["fingerprint"], f"unused for {days:.1f} days")
    if cap is not None:
        total = sum(e["disk_bytes"] for e in entries if e["fingerprint"] not in chosen)
        for e in sorted(entries, key=lambda e: e["last_used"]):  # least recently used first
            if total <= cap:
                break
            if e["fingerprint"] in chosen or e["fingerprint"] in protected:
                continue
            chosen[e["fingerprint"]] = (
                f"least recently used (the caches take more than {size_text(cap)})"
            )
            total -= e["disk_bytes"]
    out = []
    for e in entries:
        if e["fingerprint"] not in chosen:
            continue
        item = dict(e, why=chosen[e["fingerprint"]], removed=False)
        folder = Path(e["path"])
        try:
            if e["fingerprint"] in protected:
                raise CacheLockedError("in use (being built, or used by this process)")
            if dry_run:
                check_removable(folder, root)
            else:
                remove(folder, root)
                item["removed"] = True
        except CacheError as exc:
            item["skipped"] = str(exc)
        out.append(item)
    return out


def apply_size_cap(cache_dir: str | Path | None, keep: Iterable[str] = ()) -> list[dict]:
    """Remove the least recently used caches of ``cache_dir`` beyond ``$FASTFT_CACHE_MAX_SIZE``
    (unset: nothing), never those of ``keep``; one log line says what was removed."""
    text = os.environ.get(SIZE_CAP_ENV, "").strip()
    if not text:
        return []
    cap = parse_size(text, SIZE_CAP_ENV)
    done = prune(cache_dir, superseded=False, max_size=cap, keep=keep)
    removed = [e for e in done if e["removed"]]
    if removed:
        log.info(
            "cache size cap: removed %d least recently used cache(s) (%s) to keep %s under %s=%s",
            len(removed),
            size_text(sum(e["disk_bytes"] for e in removed)),
            cache_root(cache_dir),
            SIZE_CAP_ENV,
            text,
        )
    return done
