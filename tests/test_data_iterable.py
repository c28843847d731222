"""A DataLoader over an IterableDataset as cache input: its batches, in the order it yields
them, are cached and keyed by content; what the cache cannot rely on is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fastft.cache import FeatureCache
from fastft.data.loader_source import IterableSource, loader_source
from fastft.errors import DataError

pytestmark = pytest.mark.usefixtures("fresh_registry")

X = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
Y = torch.arange(20) % 3


class Stream(IterableDataset):
    """Yields (x, y) samples of X, Y; ``extra`` more than ``len()`` says, or changing ones."""

    def __init__(self, X=X, Y=Y, extra: int = 0, drift: bool = False):
        self.X, self.Y, self.extra, self.drift, self.reads = X, Y, extra, drift, 0

    def __len__(self):
        return len(self.X)

    def __iter__(self):
        self.reads += 1
        for i in range(len(self.X) + self.extra):
            x = self.X[i % len(self.X)]
            yield (x + self.reads if self.drift else x), self.Y[i % len(self.X)]


class Unsized(IterableDataset):
    """An IterableDataset without ``__len__``."""

    def __iter__(self):
        yield from zip(X, Y)


def prefix():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh()).eval()


def build(data, tmp_path, **kw):
    return FeatureCache.build(
        prefix(), data, dtype="fp32", tier="host", cache_dir=tmp_path, progress=False, **kw
    )


def test_an_iterable_loader_caches_what_the_same_tensors_give(tmp_path):
    loader = DataLoader(Stream(), batch_size=8)
    assert isinstance(loader_source(loader), IterableSource)
    from_stream = build(loader, tmp_path / "a")
    from_tensors = build((X, Y), tmp_path / "b")
    rows = torch.arange(20)
    torch.testing.assert_close(from_stream.gather(rows)[0], from_tensors.gather(rows)[0])
    assert torch.equal(from_stream.labels, Y)


def test_the_key_follows_the_yielded_content(tmp_path):
    first = build(DataLoader(Stream(), batch_size=8), tmp_path)
    again = build(DataLoader(Stream(), batch_size=8), tmp_path)
    assert again.fingerprint == first.fingerprint  # the same batches: reused
    changed = X.clone()
    changed[13, 2] += 1.0
    other = build(DataLoader(Stream(X=changed), batch_size=8), tmp_path)
    assert other.fingerprint != first.fingerprint
    assert other.parts["dataset"] != first.parts["dataset"]


def test_batches_that_change_between_reads_are_refused(tmp_path):
    with pytest.raises(DataError, match="batch 0 of the DataLoader"):
        build(DataLoader(Stream(drift=True), batch_size=8), tmp_path)


def test_more_samples_than_len_are_refused(tmp_path):
    with pytest.raises(DataError, match="more than the 20 samples its dataset's len"):
        build(DataLoader(Stream(extra=3), batch_size=8), tmp_path)


def test_an_iterable_without_a_length_is_refused(tmp_path):
    with pytest.raises(DataError, match="has no length"):
        build(DataLoader(Unsized(), batch_size=8), tmp_path)


def test_an_iterable_source_reads_in_its_own_batches():
    source = loader_source(DataLoader(Stream(), batch_size=8))
    with pytest.raises(DataError, match="known only by reading"):
        source.spans(4)
    example = source.example(k=3)
    assert torch.equal(example, X[:3])
    key = source.content_key(batch_size=5)
    assert torch.equal(key.labels, Y) and key.opaque == []
    chunks = list(source.chunks(2, 5, skip=lambda view, start, count: (view, start) == (1, 8)))
    assert [(c.view, c.start, c.count) for c in chunks] == [
        (0, 0, 8),
        (0, 8, 8),
        (0, 16, 4),
        (1, 0, 8),
        (1, 16, 4),
    ]
    inputs, labels = chunks[-1].load()
    assert torch.equal(inputs, X[16:]) and torch.equal(labels, Y[16:])
