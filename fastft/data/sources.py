"""Training data as a feature cache reads it: a fixed list of samples, loaded in chunks.

A cache row is one sample, so the cache needs the samples in a fixed order, every time:

- ``(X, y)`` tensors (``X`` may be a dict of tensors): the rows of ``X``.
- a map-style ``Dataset`` of ``(input, label)`` items: every item, stacked by fastft.
- a ``DataLoader`` over a map-style dataset: **the samples its sampler draws** (a
  ``SubsetRandomSampler``'s subset, not the whole dataset), in index order, read with its
  own ``batch_size``, ``collate_fn`` and workers. Training shuffles by itself, so shuffling
  is not needed; a sampler that draws a different set each epoch (with replacement,
  ``num_samples``, weights, a ``DistributedSampler``'s share) cannot be cached and is
  refused with a message.
- a ``DataLoader`` over an ``IterableDataset``: its batches, in the order it yields them.
- a Hugging Face ``datasets.Dataset``: its numeric columns as inputs, ``label``/``labels``
  as labels (:mod:`~fastft.data.hf_dataset`).

:func:`as_source` picks the reader of each form: :class:`TensorSource` (here),
:class:`~fastft.data.dataset_source.DatasetSource` and
:func:`~fastft.data.loader_source.loader_source`. What every reader offers (chunks, the
content key and its checks on every read) is :class:`~fastft.data.source_base.Source`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fastft import data as fdata
from fastft.data.dataset_source import DatasetSource
from fastft.data.hf_dataset import HFDataset, is_hf_dataset
from fastft.data.loader_source import loader_source
from fastft.data.refusals import check_data_form
from fastft.data.source_base import Chunk, ContentKey, Source
from fastft.errors import DataError
from fastft.hashing import ContentHasher

__all__ = ["as_source", "TensorSource"]


# ---------------------------------------------------------------------------- (X, y) tensors
class TensorSource(Source):
    def __init__(self, X: Any, y: torch.Tensor):
        super().__init__()
        self.n = fdata.dataset_length((X, y))
        self.X, self.y = X, y
        self.description = "the (X, y) tensors"
        #: The order the samples are visited in (sample positions), when not the data's own:
        #: set by a build that batches by length (see :mod:`fastft.cache.lengths`).
        self.visit_order: torch.Tensor | None = None

    def _slice(self, start: int, count: int) -> tuple[Any, torch.Tensor]:
        if self.visit_order is not None:
            rows = self.visit_order[start : start + count]
            return fdata.index_select(self.X, rows), self.y[rows]
        sl = slice(start, start + count)
        X = (
            self.X[sl]
            if isinstance(self.X, torch.Tensor)
            else {k: v[sl] for k, v in self.X.items()}
        )
        return X, self.y[sl]

    def _rows(self, start: int, count: int) -> torch.Tensor | None:
        return None if self.visit_order is None else self.visit_order[start : start + count]

    def read(self, chunks, num_workers=0):
        for view, start, count in chunks:
            yield Chunk(
                view,
                start,
                count,
                lambda s=start, c=count: self._slice(s, c),
                self._rows(start, count),
            )

    def content_key(self, batch_size, num_workers=0):
        # The tensors themselves are read again by the build: nothing to check per chunk.
        hasher = ContentHasher().update([self.X, self.y], "(X, y)")
        return ContentKey(f"n={self.n}:{hasher.hexdigest()}", self.y, hasher.opaque)


def as_source(data: Any) -> Source:
    """``data`` (``(X, y)`` tensors, a map-style Dataset, a DataLoader) as a :class:`Source`."""
    if isinstance(data, Source):
        return data
    if fdata.is_tensor_pair(data):
        return TensorSource(*data)
    if isinstance(data, DataLoader):
        return loader_source(data)
    if is_hf_dataset(data):
        return DatasetSource(HFDataset(data), description="the Hugging Face dataset")
    if isinstance(data, IterableDataset):
        raise DataError(
            "an IterableDataset needs a DataLoader around it (fastft reads it in batches); pass "
            "DataLoader(dataset, batch_size=...)."
        )
    check_data_form(data)  # numpy arrays, lists, {"x": X, "y": y}: says how to pass them
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return DatasetSource(data)
    fdata.dataset_length(data)  # raises the DataError that names the accepted forms
    raise DataError(f"unsupported data of type {type(data).__name__}.")
