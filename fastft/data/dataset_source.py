"""A map-style dataset as a :class:`~fastft.data.source_base.Source`: all of its items or a
subset of them, collated by fastft (a unit is an item) or by a DataLoader's own
``collate_fn`` in its batches (a unit is a batch); hashed in the loader's workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from fastft import data as fdata
from fastft.data.source_base import DIGEST_BYTES, Chunk, ContentKey, Source, unit_digest
from fastft.errors import DataError
from fastft.hashing import ContentHasher

__all__ = ["DatasetSource"]


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
                digests = [unit_digest(item, opaque) for item in items]
                labels = default_collate([fdata.as_pair(item, "the dataset")[1] for item in items])
                return (None, labels), digests, opaque
            batch = self.collate(items)
            return (
                (None, fdata.as_pair(batch, "the DataLoader")[1]),
                [unit_digest(batch, opaque)],
                opaque,
            )
        digests = (
            [unit_digest(item, opaque) for item in items] if self.digests and self.per_item else []
        )
        batch = self.collate(items)
        if self.digests and not self.per_item:
            digests = [unit_digest(batch, opaque)]
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

    single_pass = True  # any unit can be read on its own: a few are probed, the rest recorded

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
        self,
        batches: Iterable[list[int]],
        collate: _Collate,
        num_workers: int,
        in_process: bool = False,
    ) -> DataLoader:
        options = dict(self.loader_options)
        options.setdefault("num_workers", num_workers)
        if in_process:  # a few units: starting workers would cost more than reading them
            options.update(num_workers=0, persistent_workers=False)
            options.pop("prefetch_factor", None)
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
                    f"{self.description}: its length changed from {self.n} to {now} while it was "
                    "read; fastft caches a fixed dataset. Make its length constant (or pass a "
                    "snapshot of it)."
                )

    def _unit(self, start: int) -> int:
        return start if self.per_item else start // self.chunk_size

    def _describe_unit(self, unit: int) -> str:
        if self.per_item:
            return f"sample {unit} of {self.description} (dataset[{self._index(unit)}])"
        return f"batch {unit} of {self.description}"

    def read(self, chunks, num_workers=0, in_process=False):
        plan = _Plan(chunks, self._index)
        hashed = self._unit_digests is not None or self._seen is not None
        collate = _Collate(self.collate, self.per_item, digests=hashed)
        loader = iter(self._loader(plan, collate, num_workers, in_process))
        while True:
            try:
                batch, digests, opaque = next(loader)
                if self._seen is not None and opaque and len(self._recorded_opaque) < 4:
                    self._recorded_opaque += [o for o in opaque if o not in self._recorded_opaque]
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
                    f"{int(labels.shape[0])} labels; the collate function must keep one row per "
                    "sample."
                )
            yield Chunk(view, start, count, lambda b=(inputs, labels): b)

    def _load_failure(self, start: int, count: int, exc: Exception) -> str:
        now = None
        try:
            now = len(self.dataset)
        except Exception:
            pass
        changed = (
            f" The dataset's len() changed from {self.n} to {now}; the cache needs a dataset of "
            "fixed length."
            if self.indices is None and now is not None and now != self.n
            else ""
        )
        what = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        return (
            f"loading samples {start}..{start + count - 1} of {self.description} failed: "
            f"{what}.{changed}"
        )

    def _unit_count(self, batch_size: int) -> int:
        return self.n if self.per_item else -(-self.n // self.chunk_size)

    def units_of(self, start: int, count: int) -> range:
        if self.per_item:
            return range(start, start + count)
        return range(start // self.chunk_size, (start + count - 1) // self.chunk_size + 1)

    def probe_key(self, batch_size):
        units = self._unit_count(batch_size)
        self._start_recording(units)
        if self.per_item:
            probed = sorted({0, 1, self.n // 2, self.n - 1} & set(range(self.n)))
            spans = [(0, p, 1) for p in probed]
        else:
            probed = sorted({0, units - 1})
            spans = [
                (0, u * self.chunk_size, min(self.chunk_size, self.n - u * self.chunk_size))
                for u in probed
            ]
        collate = _Collate(self.collate, self.per_item, digests=True, labels_only=True)
        batches = [[self._index(p) for p in range(st, st + c)] for _, st, c in spans]
        try:
            for (_, start, _), (_, digests, opaque) in zip(
                spans, self._loader(batches, collate, 0, in_process=True)
            ):
                self._check_units(self._unit(start), digests, self._describe_unit)
                self._recorded_opaque += [o for o in opaque if o not in self._recorded_opaque]
        except Exception:  # the hashing pass reads them again and says what is wrong
            self._recorded, self._seen = None, None
            return None, []
        h = ContentHasher()
        h.update([self.n, self.indices is not None, self.per_item, probed], "layout")
        h.update(self._recorded[probed], "units")
        return f"n={self.n}:{h.hexdigest()}", list(self._recorded_opaque)

    def _digest_of(self, units):
        h = ContentHasher()
        h.update(self.n, "n")
        h.update(units, "units")
        h.update(self.indices is not None, "subset")
        return f"n={self.n}:{h.hexdigest()}"

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
            y = torch.as_tensor(y)
            if labels and (y.shape[1:] != labels[0].shape[1:] or y.dtype != labels[0].dtype):
                # the cache writer's own check, here before torch.cat would fail unexplained
                raise DataError(
                    f"labels of samples {start}.. have {y.dtype} {tuple(y.shape[1:])} per "
                    f"sample, the first batch had {labels[0].dtype} "
                    f"{tuple(labels[0].shape[1:])}."
                )
            labels.append(y)
            opaque += [o for o in unit_opaque if o not in opaque][: 4 - len(opaque)]
        units = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        self._adopt(units)
        self._recorded_opaque = list(opaque)
        return ContentKey(self._digest_of(units), torch.cat(labels), opaque)
