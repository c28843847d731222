"""The caches a FineTuner trains and evaluates on, built with one set of settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastft.cache import FeatureCache
from fastft.cache.derive import derived_cache
from fastft.cache.fingerprint import dataset_part
from fastft.data.sources import as_source
from fastft.model.calling import dtype_mismatch
from fastft.model.status import warn_user
from fastft.split import FrozenPrefix

#: Samples of the data a probe or the split's parity check runs on: enough to check the batch
#: axis; each probe is a frozen forward, paid before the cache is built.
PROBE_SAMPLES = 2


def example_of(data: Any) -> Any:
    """A small batch of ``data`` for probing and the split's check (the global random stream
    is left as it was: dropout in unfrozen blocks draws from it)."""
    return as_source(data).example(PROBE_SAMPLES)


@dataclass
class CacheOptions:
    """FineTuner's cache settings (see :class:`~fastft.FineTuner`)."""

    tier: str = "auto"
    dtype: str = "fp16"
    views: int = 1
    transform: Callable | None = None
    transform_id: str | None = None
    pool: str = "none"
    cache_dir: str | None = None
    max_memory: int | None = None
    batch_size: int = 256  # of the frozen pass
    amp: str | None = None
    seed: int = 0
    device: torch.device = torch.device("cpu")
    verbose: bool = True


class TunerCaches:
    """Builds (or reuses) the caches of a tuner's current split: training caches with the
    tuner's views and transform, evaluation caches with one view and none."""

    def __init__(self, options: CacheOptions):
        self.options = options
        self.said_memory = False  # told once that cache="auto" left cache_dir= unused

    def settings(self, pool: str) -> dict[str, Any]:
        """:meth:`FeatureCache.build` settings shared by every cache of the tuner; ``pool`` is
        the one of the current cut (see :meth:`TunedModel.cache_pool`)."""
        o = self.options
        return dict(
            dtype=o.dtype,
            tier=o.tier,
            pool=pool,
            batch_size=o.batch_size,
            cache_dir=o.cache_dir,
            max_memory=o.max_memory,
            progress=o.verbose,
            seed=o.seed,
            device=o.device,
            amp=o.amp,
        )

    def build(
        self,
        prefix: FrozenPrefix,
        data: Any,
        *,
        pool: str,
        train: bool,
        dataset_id: str | None = None,
        label: str | None = None,
    ) -> FeatureCache:
        """The cache of ``prefix`` over ``data``: for training (views, transform) or not.
        ``label``: its progress bar's (default ``"train cache"`` or ``"eval cache"``)."""
        o = self.options
        settings = self.settings(pool)
        if settings["progress"]:
            settings["progress"] = label or ("train cache" if train else "eval cache")
        try:
            cache = FeatureCache.build(
                prefix,
                data,
                views=o.views if train else 1,
                transform=o.transform if train else None,
                transform_id=o.transform_id if train else None,
                dataset_id=dataset_id,
                **settings,
            )
        except Exception as exc:  # data of another dtype than the model: say which
            clash = dtype_mismatch(exc, example_of(data), prefix)
            if clash is not None:
                raise clash from exc
            raise
        self._say_memory(cache)
        return cache

    def _say_memory(self, cache: FeatureCache) -> None:
        """Warn (once per tuner) when ``cache="auto"`` kept a cache in memory although the
        user named a ``cache_dir=``: that folder is not used."""
        o = self.options
        if o.tier != "auto" or o.cache_dir is None or cache.tier == "disk" or self.said_memory:
            return
        self.said_memory = True
        warn_user(
            f"cache_dir={str(o.cache_dir)!r} is not used: cache='auto' kept the features in "
            f"{cache.tier} memory because they fit ({cache.nbytes / 2**20:.1f} MiB; "
            "max_memory= sets the limit), and in-memory caches last as long as the process. "
            "Pass cache='disk' to write them to cache_dir (reused by later runs), or drop "
            "cache_dir=."
        )

    def derived(
        self, prefix: FrozenPrefix, low_tail: nn.Module, low_cache: FeatureCache, *, pool: str
    ) -> FeatureCache:
        """The cache of ``prefix`` computed from a deeper cut's cache (no pass over the data)."""
        return derived_cache(prefix, low_tail, low_cache, **self.settings(pool))

    def data_key(self, data: Any, dataset_id: str | None) -> str:
        """The data's part of the cache key (one more read of a Dataset)."""
        return dataset_part(as_source(data), dataset_id, self.options.batch_size)[0]
