"""What a feature cache reads data through: a :class:`Source` of ``n`` samples in a fixed
order, read in :class:`Chunk` objects, and the hash of its content.

:meth:`Source.content_key` reads the samples once and hashes each *unit* (an item, or a
batch of a DataLoader, after its collate function) by content; the builder compares every
unit it reads again with that hash, so a dataset whose items change between two reads
(random augmentation inside ``__getitem__``) is caught instead of cached under a key that
describes other values. A ``single_pass`` source can instead record each unit's digest as the
build first reads it (:meth:`Source.probe_key`, :meth:`Source.recorded_key`): a cache miss
then reads the data once. The sources of each form of data are in :mod:`~fastft.data.sources`.
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
    """Samples ``start..start+count-1`` of one view in the order the source visits them, with a
    function that loads them. ``rows``: the samples' own positions in the data when the visit
    order is not the data's (length-aware batching), else None (positions ``start..``)."""

    view: int
    start: int
    count: int
    load: Callable[[], tuple[Any, torch.Tensor]]
    rows: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        """The samples' positions in the data (their cache rows within a view)."""
        if self.rows is not None:
            return self.rows
        return torch.arange(self.start, self.start + self.count)

    @property
    def samples(self) -> str:
        """The samples in words, for messages: "samples 40..71", or their positions."""
        if self.rows is None:
            return f"samples {self.start}..{self.start + self.count - 1}"
        shown = ", ".join(str(int(r)) for r in self.rows[:4])
        return f"samples {shown}{', ...' if self.count > 4 else ''}"


@dataclass
class ContentKey:
    """What :meth:`Source.content_key` found: the hash of every sample and label, the labels,
    and what it could not see (``opaque``: the samples cannot be hashed soundly)."""

    digest: str
    labels: torch.Tensor | None  # None from a recorded key (the build has them)
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

    #: Whether the content key can be computed *while* building (:meth:`probe_key`, then
    #: every read recorded): one read of the data on a cache miss instead of two.
    single_pass: bool = False

    def __init__(self) -> None:
        self._unit_digests: np.ndarray | None = None  # set by content_key; checked on every read
        # Recording (a single-pass build): each unit's digest as first read, and which are known.
        self._recorded: np.ndarray | None = None
        self._seen: np.ndarray | None = None
        self._recorded_opaque: list[str] = []

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

    def probe_key(self, batch_size: int) -> tuple[str | None, list[str]]:
        """``(key, opaque)``: a cheap key of the data (its length and the digests of a few
        units, which it reads) that finds the caches that may hold it; starts recording the
        digest of every unit read from now on (see :meth:`recorded_key`). ``(None, [])`` when
        those units cannot be read (:meth:`content_key` then says why). Only for
        ``single_pass`` sources."""
        raise NotImplementedError

    def _unit_count(self, batch_size: int) -> int:
        return self.n

    def _start_recording(self, units: int) -> None:
        self._recorded = np.zeros((units, DIGEST_BYTES), dtype=np.uint8)
        self._seen = np.zeros(units, dtype=bool)
        self._recorded_opaque = []

    def recorded_key(self) -> ContentKey | None:
        """The content key of the units recorded since :meth:`probe_key` (the same as
        :meth:`content_key` gives), when every unit was read; None otherwise. Later reads are
        checked against it."""
        if self._seen is None:  # a hashing pass replaced the recording (a resumed build)
            units = self._unit_digests
            if units is None:
                return None
        elif not self._seen.all():
            return None
        else:
            units, self._recorded, self._seen = self._recorded, None, None
            self._unit_digests = units
        return ContentKey(self._digest_of(units), None, list(self._recorded_opaque))

    def digest_state(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(digests, known)`` of every unit: recorded so far, or all of a hashing pass."""
        if self._seen is not None:
            return self._recorded, self._seen
        if self._unit_digests is not None:
            return self._unit_digests, np.ones(len(self._unit_digests), dtype=bool)
        return None

    def units_of(self, start: int, count: int) -> range:
        """The units that hold samples ``start..start+count-1``."""
        return range(start, start + count)

    def _digest_of(self, units: np.ndarray) -> str:
        """The content digest of a dataset whose units have digests ``units``."""
        raise NotImplementedError

    def _adopt(self, units: np.ndarray) -> None:
        """Set the digests of a full hashing pass; the units recorded before it (the probe's)
        must agree with it."""
        if self._seen is not None:
            for unit in np.flatnonzero(self._seen):
                if units[unit].tobytes() != self._recorded[unit].tobytes():
                    raise DataError(self._changed(self._describe_unit(int(unit))))
        self._recorded, self._seen = None, None
        self._unit_digests = units

    def _describe_unit(self, unit: int) -> str:
        return f"unit {unit} of {self.description}"

    def check_unchanged(self) -> None:
        """DataError when the data's length changed since this source was made (rows would
        belong to no fixed sample)."""

    def _check_units(
        self, first_unit: int, digests: list[bytes], what: Callable[[int], str]
    ) -> None:
        if self._seen is not None:  # recording: the first read of a unit is its digest
            for i, d in enumerate(digests):
                unit = first_unit + i
                if not self._seen[unit]:
                    self._recorded[unit] = np.frombuffer(d, dtype=np.uint8)
                    self._seen[unit] = True
                elif self._recorded[unit].tobytes() != d:
                    raise DataError(self._changed(what(unit)))
            return
        if self._unit_digests is None:
            return
        for i, d in enumerate(digests):
            if self._unit_digests[first_unit + i].tobytes() != d:
                raise DataError(self._changed(what(first_unit + i)))

    @staticmethod
    def _changed(what: str) -> str:
        return (
            f"{what} is not what it was when fastft hashed it a moment "
            "ago: the data gives different values on each read (random augmentation "
            "inside the Dataset, a shuffling IterableDataset, or data changed by another "
            "thread). A cache holds fixed samples: move the random transform to "
            "transform= (with views=K for K augmented views per sample), or pass "
            "dataset_id= to cache one draw of it knowingly."
        )
