"""A DataLoader as a :class:`~fastft.data.source_base.Source`: the samples its sampler draws
from a map-style dataset (refused, with a message, when they change from epoch to epoch), or
the batches of a DataLoader over an ``IterableDataset``, in the order it yields them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from fastft import data as fdata
from fastft.data.dataset_source import DatasetSource
from fastft.data.source_base import DIGEST_BYTES, Chunk, ContentKey, Source, unit_digest
from fastft.errors import DataError
from fastft.hashing import ContentHasher

__all__ = ["IterableSource", "loader_source"]


# ---------------------------------------------------------------------------- iterable loaders
class IterableSource(Source):
    """A DataLoader over an IterableDataset: its batches in the order it yields them."""

    def __init__(self, loader: DataLoader):
        super().__init__()
        self.loader = loader
        self.n = fdata.dataset_length(loader)
        self.description = "the DataLoader"

    def spans(self, batch_size):
        raise DataError("an iterable DataLoader's batches are known only by reading it")

    def _batches(self) -> Iterator[tuple[int, Any, torch.Tensor]]:
        start = 0
        for batch in self.loader:
            inputs, labels = fdata.as_pair(batch, "the DataLoader")
            count = int(labels.shape[0])
            if start + count > self.n:
                raise DataError(
                    f"the DataLoader yielded more than the {self.n} samples its dataset's len() "
                    "reported; the cache needs a fixed dataset."
                )
            yield start, (inputs, labels), batch
            start += count

    def chunks(self, views, batch_size, skip, num_workers=0):
        # Its batches are the chunks, known only by reading: each view reads them all (an
        # iterable cannot skip) and hands out those not skipped.
        for view in range(views):
            for unit, (start, pair, batch) in enumerate(self._batches()):
                if self._unit_digests is not None:
                    self._check_units(
                        unit, [unit_digest(batch)], lambda u: f"batch {u} of the DataLoader"
                    )
                count = int(pair[1].shape[0])
                if not skip(view, start, count):
                    yield Chunk(view, start, count, lambda b=pair: b)

    def example(self, k=2):
        with torch.random.fork_rng(devices=[]):
            _, (inputs, _), _ = next(self._batches())
        return fdata.index_select(inputs, torch.arange(min(k, fdata.batch_length(inputs))))

    def content_key(self, batch_size, num_workers=0):
        digests, labels, opaque = [], [], []
        for _, (_, y), batch in self._batches():
            digests.append(unit_digest(batch, opaque))
            labels.append(y)
        self._unit_digests = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(
            -1, DIGEST_BYTES
        )
        h = ContentHasher().update(self._unit_digests, "batches")
        return ContentKey(f"n={self.n}:iterable:{h.hexdigest()}", torch.cat(labels), opaque)


# ---------------------------------------------------------------------------- DataLoaders
def _refuse_sampler(why: str) -> DataError:
    return DataError(
        f"the DataLoader's sampler {why}. fastft caches a fixed set of samples, runs the frozen "
        "layers on each once and shuffles them itself every epoch: pass a DataLoader whose "
        "sampler is sequential, shuffling (RandomSampler without replacement) or a fixed subset "
        "(SubsetRandomSampler), or the Dataset itself (torch.utils.data.Subset for a part of it); "
        "for class balance use fit(class_weights=...)."
    )


def _sampler_indices(loader: DataLoader) -> list[int]:
    """The samples a map-style DataLoader draws, in index order; DataError for samplers that
    draw a different set each epoch."""
    n = len(loader.dataset)
    sampler = loader.sampler
    batches = loader.batch_sampler
    if batches is not None and not (
        isinstance(batches, BatchSampler) and batches.sampler is sampler
    ):
        raise DataError(
            "the DataLoader has a custom batch_sampler; fastft reads samples in batches of its "
            "own. Pass a DataLoader with batch_size= and a sampler instead (its collate_fn is "
            "kept)."
        )
    if loader.batch_size is None:
        raise DataError(
            "the DataLoader has batch_size=None (its dataset returns whole batches); fastft needs "
            "samples. Pass a DataLoader with batch_size= over a dataset of (input, label) samples."
        )
    if isinstance(sampler, SequentialSampler):
        return list(range(n))
    if isinstance(sampler, DistributedSampler):
        raise _refuse_sampler(
            "is a DistributedSampler, which gives this process a share that changes every "
            "epoch (under torch.distributed fastft shards the work itself: give every rank "
            "the whole dataset)"
        )
    if isinstance(sampler, WeightedRandomSampler):
        raise _refuse_sampler(
            "draws weighted samples with replacement, a different multiset every epoch"
        )
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.num_samples != len(sampler.data_source):
            raise _refuse_sampler(
                f"draws {sampler.num_samples} of {len(sampler.data_source)} samples"
                f"{' with replacement' if sampler.replacement else ''}, a different set "
                "every epoch"
            )
        return list(range(n))
    try:
        if isinstance(sampler, SubsetRandomSampler):
            indices = sorted(int(i) for i in sampler.indices)
        else:  # a sampler of its own: cacheable when it draws the same samples every time
            first, second = sorted(int(i) for i in sampler), sorted(int(i) for i in sampler)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"the DataLoader's sampler yields something other than sample indices ({exc}); fastft "
            "caches the samples of a map-style dataset by their integer index."
        ) from None
    if not isinstance(sampler, SubsetRandomSampler):
        if first != second:
            raise _refuse_sampler(
                f"({type(sampler).__name__}) drew a different set of samples on two passes"
            )
        indices = first
    bad = [i for i in indices[:1] + indices[-1:] if not 0 <= i < n]
    if bad:
        raise DataError(
            f"the DataLoader's sampler yields index {bad[0]}, outside its dataset of {n} samples."
        )
    return indices


def loader_source(loader: DataLoader) -> Source:
    """The samples of a DataLoader (see the module docstring)."""
    if isinstance(loader.dataset, IterableDataset):
        return IterableSource(loader)
    indices = _sampler_indices(loader)
    n = len(loader.dataset)
    if loader.drop_last and len(indices) % loader.batch_size:
        warnings.warn(
            f"the DataLoader's drop_last=True is ignored: fastft caches all {len(indices)} samples "
            "its sampler draws and trains on every one of them each epoch.",
            UserWarning,
            stacklevel=4,
        )
    subset = indices != list(range(n))
    options = {
        k: getattr(loader, k)
        for k in (
            "num_workers",
            "pin_memory",
            "worker_init_fn",
            "timeout",
            "multiprocessing_context",
            "persistent_workers",
        )
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    description = (
        f"the DataLoader's {len(indices)} sampled samples of its dataset of {n}"
        if subset
        else "the DataLoader"
    )
    return DatasetSource(
        loader.dataset,
        indices=indices if subset else None,
        collate=loader.collate_fn,
        chunk_size=loader.batch_size,
        loader_options=options,
        description=description,
    )
