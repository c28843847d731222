"""What a feature cache reads data through: a :class:`Source` of ``n`` samples in a fixed
order, read in :class:`Chunk` objects, and the hash of its content.

:meth:`Source.content_key` reads the samples once and hashes each *unit* (an item, or a
batch of a DataLoader, after its collate function) by content; the builder compares every
unit it reads again with that hash, so a dataset whose items change between two reads
(random augmentation inside ``__getitem__``) is caught instead of cached under a key that
describes other values. The sources of each form of data are in :mod:`~fastft.data.sources`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastft import data as fdata
from fastft.errors import DataError
from fastft.hashing import ContentHasher

__all__ = ["Source", "Chunk", "ContentKey", "DIGEST_BYTES", "unit_digest"]

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


def unit_digest(obj: Any, opaque: list[str] | None = None) -> bytes:
    """The first ``DIGEST_BYTES`` of a unit's content hash; the first of what it could not see
    is added to ``opaque`` while it holds fewer than four."""
    hasher = ContentHasher().update(obj, "sample")
    if opaque is not None and hasher.opaque and len(opaque) < 4:
        opaque.extend(hasher.opaque[:1])
    return bytes.fromhex(hasher.hexdigest())[:DIGEST_BYTES]


class Source:
    """``n`` samples in a fixed order, read in chunks (see the module docstring and
    :mod:`~fastft.data.sources`)."""

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
                    f"{what(first_unit + i)} is not what it was when fastft hashed it a moment "
                    "ago: the data gives different values on each read (random augmentation "
                    "inside the Dataset, a shuffling IterableDataset, or data changed by another "
                    "thread). A cache holds fixed samples: move the random transform to "
                    "transform= (with views=K for K augmented views per sample), or pass "
                    "dataset_id= to cache one draw of it knowingly."
                )
