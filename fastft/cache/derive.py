"""A higher cut's cache computed from a lower cut's cache, not from the raw data.

Progressive unfreezing trains the head first and the top blocks later, so it needs two
caches: at the head's input and at the input of the lowest block it will unfreeze. Built
from the data, each costs a frozen pass. When the lower cut is a replay split (its cache
holds the hidden states at the cut and the model's own inputs), the higher cut's features
follow from the lower cache by running only the layers between the two cuts: the model's
forward is replayed with everything below the low cut skipped (see ``fastft.split.replay``)
while the higher cut's prefix captures its taps. For MiniLM with its top layer as the only
gap, that is one layer instead of six.

The derived cache is content-addressed like any other: the higher prefix's weights and
structure, plus the lower cache's fingerprint as the dataset identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fastft.cache import FeatureCache
from fastft.split import FrozenPrefix, TrainableTail
from fastft.split.replay import ReplayTail


def can_derive(low_tail: TrainableTail | None, low_cache: FeatureCache | None) -> bool:
    """Whether caches of higher cuts can be computed from ``low_cache`` (a one-view cache of a
    replay split)."""
    return (
        low_tail is not None
        and low_cache is not None
        and isinstance(low_tail.body, ReplayTail)
        and low_cache.num_views == 1
    )


class CacheRows(Dataset):
    """A cache as a map-style dataset of ``({'tap0': ..., 'tap1': ...}, label)`` items; batches
    are gathered with one ``cache_gather`` per tap (``__getitems__``)."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_rows

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, rows: list[int]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        index = torch.as_tensor(rows, dtype=torch.int64)
        taps = self.cache.gather_shaped(index, out_dtype=torch.float32)
        labels = self.cache.labels[index]
        return [
            ({f"tap{t}": taps[t][j] for t in range(len(taps))}, labels[j]) for j in range(len(rows))
        ]


class DerivedPrefix(nn.Module):
    """``high`` (a frozen prefix of the model) evaluated on rows of a lower replay cut's cache."""

    _fastft_prefix = True  # asked for its signature() and key_mask() by the cache key

    def __init__(self, high: FrozenPrefix, low_tail: TrainableTail):
        super().__init__()
        self.high = high
        object.__setattr__(self, "_low", low_tail.body)  # shares the model; not registered twice
        self.tap_names = list(high.tap_names)
        self._signature = f"derived from the replay cut {low_tail.tap_names[0]}\n{high.signature()}"

    def signature(self) -> str:
        return self._signature

    def key_mask(self):
        """What runs after the higher cut (see :meth:`FrozenPrefix.key_mask`)."""
        return self.high.key_mask()

    def forward(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, *inputs = (x[f"tap{i}"] for i in range(len(x)))
        with self._low.replaying(hidden):
            return self.high(self._low.raw_inputs(tuple(inputs)))


def derived_cache(
    high: FrozenPrefix, low_tail: TrainableTail, low_cache: FeatureCache, **build: Any
) -> FeatureCache:
    """The cache of ``high`` over the samples of ``low_cache``, in the same order, with the
    same labels; ``build`` are :meth:`FeatureCache.build` settings (dtype, tier, ...)."""
    # Reading the rows through a DataLoader draws from the global generator; the training
    # that follows must see the random stream it would see without this step.
    with torch.random.fork_rng(devices=[]):
        return FeatureCache.build(
            DerivedPrefix(high, low_tail),
            CacheRows(low_cache),
            dataset_id=f"fastft-derived:{low_cache.fingerprint}",
            **build,
        )
