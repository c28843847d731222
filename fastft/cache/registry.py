"""The caches of this process, by fingerprint, and why a key is new.

In-memory tiers cannot be found again any other way: a few recent caches are kept alive,
and any other one is found while its caller still holds it. A disk cache removed since
(``fastft cache rm``) is forgotten, never read as a ghost.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict, deque
from pathlib import Path

from fastft.cache import disk
from fastft.cache.fingerprint import PARTS, PENDING, changed_parts, describe_changes, lookup
from fastft.cache.store import Store
from fastft.errors import CacheError

__all__ = ["register", "registered", "in_use", "forget", "clear", "explain"]

_SIZE = 4
_recent: OrderedDict[str, Store] = OrderedDict()
_alive: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()
_history: deque = deque(maxlen=64)  # (fingerprint, parts) of recent keys, to explain rebuilds


def register(cache: Store) -> None:
    """Remember ``cache`` (kept alive among the few most recent)."""
    _alive[cache.fingerprint] = cache
    _recent[cache.fingerprint] = cache
    _recent.move_to_end(cache.fingerprint)
    while len(_recent) > _SIZE:
        _recent.popitem(last=False)
    _history.append((cache.fingerprint, cache.parts))


def registered(fp: str) -> Store | None:
    """The cache ``fp`` of this process, if any (and still on disk, for a disk cache)."""
    found = _recent.get(fp) or _alive.get(fp)
    if (
        found is not None
        and found.path is not None
        and not (Path(found.path) / disk.MANIFEST).is_file()
    ):
        forget(fp)
        return None
    return found


def in_use() -> set[str]:
    """Fingerprints of the caches this process holds (never evicted by a size cap)."""
    return set(_recent) | set(_alive.keys())


def forget(fp: str) -> None:
    """Forget the cache ``fp`` of this process (it is rebuilt, or reopened from disk)."""
    _recent.pop(fp, None)
    _alive.pop(fp, None)


def clear() -> None:
    """Forget the caches of this process (they are rebuilt, or reopened from disk, next time)."""
    _recent.clear()
    _alive.clear()


def explain(parts: dict, root: Path) -> str:
    """Why a key is new: the parts that differ from the nearest cache seen before (in this
    process or on disk), e.g. ``'rebuilt: the frozen weights changed'``."""
    candidates = list(_history)
    if root.is_dir():
        for folder in root.iterdir():
            try:
                manifest = disk.read_manifest(folder)
                candidates.append((manifest["fingerprint"], manifest["parts"]))
            except (OSError, CacheError):
                continue
    best = None
    for _, old in candidates:
        changed = changed_parts(old, parts)
        if not changed:
            return "new in this tier: the same key was cached in another tier"
        if best is None or len(changed) <= len(best):
            best = changed
    if best is None or len(best) == len(PARTS):
        return "new: no cache with this key"
    if "weights" in best and "dataset" in best:  # the nearest is of another model and data
        return "new: no cache of this model and data"
    return f"rebuilt: {describe_changes(best)} changed"


def similar(parts: dict, root: Path) -> bool:
    """Whether a reusable cache of this process or in ``root`` (complete or interrupted) may
    be the cache of the pending key ``parts``: all its parts but the data's are the same (see
    :func:`~fastft.cache.fingerprint.lookup`)."""
    want = lookup(parts)
    for cache in [*_recent.values(), *_alive.values()]:
        if "once" not in cache.parts and lookup(cache.parts) == want:
            return True
    if root.is_dir():
        for folder in root.iterdir():
            try:
                found = disk.read_manifest(folder)["parts"]
            except (OSError, CacheError, KeyError, TypeError):
                continue
            pending = found.get("dataset") == PENDING  # resumed as such, never reused
            if "once" not in found and not pending and lookup(found) == want:
                return True
    return False
