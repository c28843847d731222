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

:meth:`Source.content_key` reads the samples once and hashes each *unit* (an item, or a
batch of a DataLoader, after its collate function) by content; the builder compares every
unit it reads again with that hash, so a dataset whose items change between two reads
(random augmentation inside ``__getitem__``) is caught instead of cached under a key that
describes other values.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
)
from torch.utils.data.distributed import DistributedSampler

from fastft import data as fdata
from fastft.errors import DataError
from fastft.hashing import ContentHasher

__all__ = ["Source", "as_source", "Chunk"]

DIGEST_BYTES = 16  # per unit: a collision needs 2**64 units


@dataclass
class Chunk:
    """Samples ``start..start+count-1`` of one view, with a function that loads them."""

    view: int
    start: int
    count: int
    load: Callable[[], tuple[Any, torch.Tensor]]


@dataclass
class ContentKey:
    """What :meth:`Source.content_key` found: the hash of every sample and label, the labels,
    and what it could not see (``opaque``: the samples cannot be hashed soundly)."""

    digest: str
    labels: torch.Tensor
    opaque: list[str]


def _digest(obj: Any, opaque: list[str] | None = None) -> bytes:
    hasher = ContentHasher().update(obj, "sample")
    if opaque is not None and hasher.opaque and len(opaque) < 4:
        opaque.extend(hasher.opaque[:1])
    return bytes.fromhex(hasher.hexdigest())[:DIGEST_BYTES]


class Source:
    """``n`` samples in a fixed order, read in chunks (see the module docstring)."""

    n: int
    #: A batch size the data imposes (a DataLoader's: its collate function may pad or mix per
    #: batch), or None when the reader chooses.
    chunk_size: int | None = None
    description: str = "the data"

    def __init__(self) -> None:
        self._unit_digests: np.ndarray | None = None  # set by content_key; checked on every read

    # ------------------------------------------------------------------ layout
    def spans(self, batch_size: int) -> Iterator[tuple[int, int]]:
        """``(start, count)`` of every chunk, in order (lazily: views x chunks may be large)."""
        size = self.chunk_size or batch_size
        for start in range(0, self.n, size):
            yield start, min(size, self.n - start)

    # ------------------------------------------------------------------ reading
    def chunks(
        self,
        views: int,
        batch_size: int,
        skip: Callable[[int, int, int], bool],
        num_workers: int = 0,
    ) -> Iterator[Chunk]:
        """A :class:`Chunk` for every ``(view, start, count)`` of every view that ``skip`` does
        not skip (asked once per chunk, in order), its samples checked against the content key
        when one was computed."""
        plan = (
            (view, start, count) for view in range(views) for start, count in self.spans(batch_size)
        )
        return self.read((c for c in plan if not skip(*c)), num_workers)

    def read(self, chunks: Iterable[tuple[int, int, int]], num_workers: int = 0) -> Iterator[Chunk]:
        """A :class:`Chunk` per ``(view, start, count)`` (lazily consumed)."""
        raise NotImplementedError

    def example(self, k: int = 2) -> Any:
        """The inputs of the first ``k`` samples (for probing the model), leaving the global
        random stream untouched."""
        with torch.random.fork_rng(devices=[]):
            first = next(self.read([(0, 0, min(self.chunk_size or k, self.n))]))
            inputs, _ = first.load()
        return fdata.index_select(inputs, torch.arange(min(k, fdata.batch_length(inputs))))

    # ------------------------------------------------------------------ content
    def content_key(self, batch_size: int, num_workers: int = 0) -> ContentKey:
        """Read every sample once: the hash of their content (and labels), remembered per unit
        so that later reads are checked against it."""
        raise NotImplementedError

    def check_unchanged(self) -> None:
        """DataError when the data's length changed since this source was made (rows would
        belong to no fixed sample)."""

    def _check_units(
        self, first_unit: int, digests: list[bytes], what: Callable[[int], str]
    ) -> None:
        if self._unit_digests is None:
            return
        for i, d in enumerate(digests):
            if self._unit_digests[first_unit + i].tobytes() != d:
                raise DataError(
                    f"{what(first_unit + i)} is not what it was when fastft hashed it a moment ago: the data "
                    "gives different values on each read (random augmentation inside the Dataset, a shuffling "
                    "IterableDataset, or data changed by another thread). A cache holds fixed samples: move the "
                    "random transform to transform= (with views=K for K augmented views per sample), or pass "
                    "dataset_id= to cache one draw of it knowingly."
                )


# ---------------------------------------------------------------------------- (X, y) tensors
class TensorSource(Source):
    def __init__(self, X: Any, y: torch.Tensor):
        super().__init__()
        self.n = fdata.dataset_length((X, y))
        self.X, self.y = X, y
        self.description = "the (X, y) tensors"

    def _slice(self, start: int, count: int) -> tuple[Any, torch.Tensor]:
        sl = slice(start, start + count)
        X = (
            self.X[sl]
            if isinstance(self.X, torch.Tensor)
            else {k: v[sl] for k, v in self.X.items()}
        )
        return X, self.y[sl]

    def read(self, chunks, num_workers=0):
        for view, start, count in chunks:
            yield Chunk(view, start, count, lambda s=start, c=count: self._slice(s, c))

    def content_key(self, batch_size, num_workers=0):
        # The tensors themselves are read again by the build: nothing to check per chunk.
        hasher = ContentHasher().update([self.X, self.y], "(X, y)")
        return ContentKey(f"n={self.n}:{hasher.hexdigest()}", self.y, hasher.opaque)


# ---------------------------------------------------------------------------- map-style datasets
class _Collate:
    """A DataLoader collate function that also returns the digest of each unit it collates:
    of each item (``per_item``, before stacking) or of the collated batch. Runs in the
    loader's workers, so hashing is parallel with loading."""

    def __init__(self, collate: Callable, per_item: bool, digests: bool, labels_only: bool = False):
        self.collate, self.per_item, self.digests, self.labels_only = (
            collate,
            per_item,
            digests,
            labels_only,
        )

    def __call__(self, items: list) -> tuple[Any, list[bytes], list[str]]:
        opaque: list[str] = []
        if self.labels_only:  # a hashing pass: digests and labels, no stacked inputs
            if self.per_item:
                digests = [_digest(item, opaque) for item in items]
                labels = default_collate([fdata.as_pair(item, "the dataset")[1] for item in items])
                return (None, labels), digests, opaque
            batch = self.collate(items)
            return (
                (None, fdata.as_pair(batch, "the DataLoader")[1]),
                [_digest(batch, opaque)],
                opaque,
            )
        digests = (
            [_digest(item, opaque) for item in items] if self.digests and self.per_item else []
        )
        batch = self.collate(items)
        if self.digests and not self.per_item:
            digests = [_digest(batch, opaque)]
        return batch, digests, opaque


class _Plan:
    """The batch sampler of a read: yields each chunk's dataset indices to the DataLoader (which
    may run ahead of the consumer with workers) and remembers which chunk each batch is."""

    def __init__(self, chunks: Iterable[tuple[int, int, int]], index: Callable[[int], int]):
        self._chunks, self._index = iter(chunks), index
        self._issued: deque = deque()

    def __iter__(self) -> Iterator[list[int]]:
        for view, start, count in self._chunks:
            self._issued.append((view, start, count))
            yield [self._index(p) for p in range(start, start + count)]

    def pop(self) -> tuple[int, int, int]:
        """The chunk of the batch the DataLoader just returned (it returns them in order)."""
        return self._issued.popleft()

    def oldest(self) -> tuple[int, int, int]:
        """The chunk the DataLoader was loading when it failed."""
        return self._issued[0] if self._issued else (0, 0, 0)


class DatasetSource(Source):
    """Samples ``indices`` of a map-style dataset (all of it by default), collated by fastft
    (units: items) or by a DataLoader's own ``collate_fn`` in its batches (units: batches)."""

    def __init__(
        self,
        dataset: Any,
        *,
        indices: list[int] | None = None,
        collate: Callable | None = None,
        chunk_size: int | None = None,
        loader_options: dict | None = None,
        description: str = "the dataset",
    ):
        super().__init__()
        self.dataset = dataset
        self.indices = indices
        self.n = len(indices) if indices is not None else fdata.dataset_length(dataset)
        if self.n == 0:
            raise DataError(
                f"{description} holds no samples: there is nothing to run the model on."
            )
        self.collate = collate or fdata.collate
        self.per_item = collate is None  # fastft's own stacking: a unit is an item
        self.chunk_size = chunk_size
        self.loader_options = loader_options or {}
        self.description = description

    def _index(self, position: int) -> int:
        return position if self.indices is None else self.indices[position]

    def _loader(
        self, batches: Iterable[list[int]], collate: _Collate, num_workers: int
    ) -> DataLoader:
        options = dict(self.loader_options)
        options.setdefault("num_workers", num_workers)
        # Its own generator: a DataLoader otherwise draws its base seed from the global one,
        # and reading data must not change the random stream of the training that follows.
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(0),
            **options,
        )

    def check_unchanged(self) -> None:
        if self.indices is None:
            now = fdata.dataset_length(self.dataset)
            if now != self.n:
                raise DataError(
                    f"{self.description}: its length changed from {self.n} to {now} while it was read; fastft "
                    "caches a fixed dataset. Make its length constant (or pass a snapshot of it)."
                )

    def _unit(self, start: int) -> int:
        return start if self.per_item else start // self.chunk_size

    def _describe_unit(self, unit: int) -> str:
        if self.per_item:
            return f"sample {unit} of {self.description} (dataset[{self._index(unit)}])"
        return f"batch {unit} of {self.description}"

    def read(self, chunks, num_workers=0):
        plan = _Plan(chunks, self._index)
        collate = _Collate(self.collate, self.per_item, digests=self._unit_digests is not None)
        loader = iter(self._loader(plan, collate, num_workers))
        while True:
            try:
                batch, digests, _ = next(loader)
                inputs, labels = fdata.as_pair(
                    batch, "the dataset" if self.per_item else "the DataLoader"
                )
            except StopIteration:
                return
            except (
                Exception
            ) as exc:  # the dataset's own error, or its items' (collate): name the samples
                _, start, count = plan.oldest()
                raise DataError(self._load_failure(start, count, exc)) from exc
            view, start, count = plan.pop()
            self._check_units(self._unit(start), digests, self._describe_unit)
            if int(labels.shape[0]) != count:
                raise DataError(
                    f"{self.description}: samples {start}..{start + count - 1} came as a batch of "
                    f"{int(labels.shape[0])} labels; the collate function must keep one row per sample."
                )
            yield Chunk(view, start, count, lambda b=(inputs, labels): b)

    def _load_failure(self, start: int, count: int, exc: Exception) -> str:
        now = None
        try:
            now = len(self.dataset)
        except Exception:
            pass
        changed = (
            f" The dataset's len() changed from {self.n} to {now}; the cache needs a dataset of fixed length."
            if self.indices is None and now is not None and now != self.n
            else ""
        )
        what = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        return f"loading samples {start}..{start + count - 1} of {self.description} failed: {what}.{changed}"

    def content_key(self, batch_size, num_workers=0):
        spans = list(self.spans(batch_size))
        batches = [[self._index(p) for p in range(start, start + count)] for start, count in spans]
        collate = _Collate(self.collate, self.per_item, digests=True, labels_only=True)
        digests: list[bytes] = []
        labels: list[torch.Tensor] = []
        opaque: list[str] = []
        loader = iter(self._loader(batches, collate, num_workers))
        for start, count in spans:
            try:
                (_, y), unit_digests, unit_opaque = next(loader)
            except Exception as exc:
                raise DataError(self._load_failure(start, count, exc)) from exc
            digests += unit_digests
            labels.append(torch.as_tensor(y))
            opaque += [o for o in unit_opaque if o not in opaque][: 4 - len(opaque)]
        self._unit_digests = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(
            -1, DIGEST_BYTES
        )
        h = ContentHasher()
        h.update(self.n, "n")
        h.update(self._unit_digests, "units")
        h.update(self.indices is not None, "subset")
        return ContentKey(f"n={self.n}:{h.hexdigest()}", torch.cat(labels), opaque)


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
                        unit, [_digest(batch)], lambda u: f"batch {u} of the DataLoader"
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
            digests.append(_digest(batch, opaque))
            labels.append(y)
        self._unit_digests = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(
            -1, DIGEST_BYTES
        )
        h = ContentHasher().update(self._unit_digests, "batches")
        return ContentKey(f"n={self.n}:iterable:{h.hexdigest()}", torch.cat(labels), opaque)


# ---------------------------------------------------------------------------- DataLoaders
def _refuse_sampler(why: str) -> DataError:
    return DataError(
        f"the DataLoader's sampler {why}. fastft caches a fixed set of samples, runs the frozen layers on "
        "each once and shuffles them itself every epoch: pass a DataLoader whose sampler is sequential, "
        "shuffling (RandomSampler without replacement) or a fixed subset (SubsetRandomSampler), or the "
        "Dataset itself (torch.utils.data.Subset for a part of it); for class balance use "
        "fit(class_weights=...)."
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
            "the DataLoader has a custom batch_sampler; fastft reads samples in batches of its own. Pass a "
            "DataLoader with batch_size= and a sampler instead (its collate_fn is kept)."
        )
    if loader.batch_size is None:
        raise DataError(
            "the DataLoader has batch_size=None (its dataset returns whole batches); fastft needs samples. "
            "Pass a DataLoader with batch_size= over a dataset of (input, label) samples."
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
            f"the DataLoader's drop_last=True is ignored: fastft caches all {len(indices)} samples its sampler "
            "draws and trains on every one of them each epoch.",
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


def as_source(data: Any) -> Source:
    """``data`` (``(X, y)`` tensors, a map-style Dataset, a DataLoader) as a :class:`Source`."""
    if isinstance(data, Source):
        return data
    if fdata.is_tensor_pair(data):
        return TensorSource(*data)
    if isinstance(data, DataLoader):
        return loader_source(data)
    if isinstance(data, IterableDataset):
        raise DataError(
            "an IterableDataset needs a DataLoader around it (fastft reads it in batches); pass "
            "DataLoader(dataset, batch_size=...)."
        )
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return DatasetSource(data)
    fdata.dataset_length(data)  # raises the DataError that names the accepted forms
    raise DataError(f"unsupported data of type {type(data).__name__}.")
