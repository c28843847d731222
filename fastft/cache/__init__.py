"""The feature cache: frozen features computed once per sample, stored compactly, gathered fast.

``FeatureCache.build(prefix, dataset, ...)`` runs the frozen prefix over the dataset (or
reuses a cache with the same content address) and ``cache.gather(rows)`` reads rows back
for training. Modules, one job each:

- :mod:`~fastft.cache.fingerprint`: the content address and what changed in it;
- :mod:`~fastft.cache.storage`: storage dtypes, tiers and the tier choice;
- :mod:`~fastft.cache.disk`: the on-disk format (manifest, raw files, journal, lock);
- :mod:`~fastft.cache.builder`: running the prefix and writing through ``cache_write``;
- :mod:`~fastft.cache.feature_cache`: the ``FeatureCache`` object and its reads;
- :mod:`~fastft.cache.manage`: ``list``, ``info``, ``verify``, ``remove`` of disk caches.
"""

from __future__ import annotations

from fastft.cache.feature_cache import FeatureCache, TapInfo
from fastft.cache.manage import default_cache_dir, info, list, list_caches, remove, verify

__all__ = ["FeatureCache", "TapInfo", "default_cache_dir", "list", "list_caches", "info", "verify", "remove"]
