"""The feature cache: frozen features computed once per sample, stored compactly, gathered fast.

``FeatureCache.build(prefix, dataset, ...)`` runs the frozen prefix over the dataset (or
reuses a cache with the same content address) and ``cache.gather(rows)`` reads rows back
for training. Modules, one job each:

- :mod:`~fastft.cache.feature_cache`: the public ``FeatureCache`` (build, open);
- :mod:`~fastft.cache.store`: a cache's contents and its reads (gathers, checks on read);
- :mod:`~fastft.cache.layout`: storage dtypes and their names, tiers, taps, storage tensors;
- :mod:`~fastft.cache.fingerprint`: the content address and what changed in it;
- :mod:`~fastft.cache.build`: the steps of a build, and reuse;
- :mod:`~fastft.cache.writer`: running the prefix on chunks and writing into storage;
- :mod:`~fastft.cache.activations`: the prefix's outputs as the cache stores them, and checks;
- :mod:`~fastft.cache.job`: a build's job, and the loop over the chunks it still needs;
- :mod:`~fastft.cache.telemetry`: the time a build spent and what it reports;
- :mod:`~fastft.cache.disk_build`, :mod:`~fastft.cache.sharded`: building on disk, alone or
  with every rank of a torch.distributed group;
- :mod:`~fastft.cache.registry`: the caches of this process;
- :mod:`~fastft.cache.disk`, :mod:`~fastft.cache.journal`, :mod:`~fastft.cache.folders`: the
  on-disk format, the journal of committed chunks and its checks, folders, locks, removal;
- :mod:`~fastft.cache.derive`: a higher cut's cache computed from a lower cut's cache;
- :mod:`~fastft.cache.staging`: overlapped input copies for builds on a GPU;
- :mod:`~fastft.cache.manage`: ``list``, ``info``, ``verify``, ``remove``, ``prune`` of disk
  caches.
"""

from __future__ import annotations

from fastft.cache.feature_cache import FeatureCache, TapInfo
from fastft.cache.manage import default_cache_dir, info, list_caches, prune, remove, verify
from fastft.cache.registry import clear as clear_registry

__all__ = [
    "FeatureCache",
    "TapInfo",
    "default_cache_dir",
    "list_caches",
    "info",
    "verify",
    "remove",
    "prune",
    "clear_registry",
]
