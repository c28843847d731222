"""What a cache costs on a map-style Dataset, counted in ``__getitem__`` calls (issue 19).

A miss reads each item once (the data are hashed while the cache is built), a hit reads
each item at most once (one hashing pass, no frozen pass), a hit with ``dataset_id=`` reads
none for hashing; and reading less never reuses a stale cache: a changed item rebuilds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fastft
from fastft.cache import FeatureCache, registry
from fastft.errors import DataError

pytestmark = pytest.mark.usefixtures("fresh_registry")

N = 40
SLACK = 4  # the few items read to probe the data (a cheap key)
FIT_SLACK = 8  # and, in fit, the few that show the model's input shape


class Counting(Dataset):
    """``(X[i], y[i])`` items that count how often they are read."""

    def __init__(self, n: int = N, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.calls += 1
        return self.X[i], self.y[i]

    def reads(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


class CountingPrefix(nn.Module):
    fastft_key_ignore = ("calls",)  # test instrumentation, not computation

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def build(prefix, data, tmp_path, tier="host", **kw):
    return FeatureCache.build(
        prefix,
        data,
        dtype="fp32",
        tier=tier,
        cache_dir=tmp_path,
        progress=False,
        batch_size=8,
        **kw,
    )


def rows(cache) -> torch.Tensor:
    return cache.gather(torch.arange(cache.num_rows))[0]


def expected(prefix, data: Counting) -> torch.Tensor:
    with torch.no_grad():
        return prefix.linear(data.X)


@pytest.mark.parametrize("tier", ["host", "auto"])
def test_a_miss_reads_each_item_once_and_a_hit_at_most_once(tmp_path, tier):
    torch.manual_seed(0)
    prefix, data = CountingPrefix(), Counting()
    first = build(prefix, data, tmp_path, tier)
    miss_reads, prefix_calls = data.reads(), prefix.calls
    assert first.telemetry["hit"] is False and prefix_calls == N // 8
    assert N <= miss_reads <= N + SLACK
    torch.testing.assert_close(rows(first), expected(prefix, data))
    assert torch.equal(first.labels, data.y)

    again = build(prefix, data, tmp_path, tier)
    assert again.telemetry["hit"] is True and prefix.calls == prefix_calls  # no frozen pass
    assert again.fingerprint == first.fingerprint
    assert N <= data.reads() <= N + SLACK


def test_the_key_hashed_while_building_is_the_key_of_a_hashing_pass(tmp_path):
    """The disk build finds the memory cache of the same key in this process, so it hashes
    first, then builds; the memory build hashed while it built: both keys must be the same, or
    no build of one would ever be found by the other."""
    prefix, data = CountingPrefix(), Counting()
    in_memory = build(prefix, data, tmp_path, "host")
    on_disk = build(prefix, data, tmp_path, "disk")
    assert on_disk.telemetry["hit"] is False  # another tier: built, and named alike
    assert in_memory.fingerprint == on_disk.fingerprint
    assert in_memory.parts == on_disk.parts


def test_a_hit_with_dataset_id_reads_no_item(tmp_path):
    prefix, data = CountingPrefix(), Counting()
    build(prefix, data, tmp_path, dataset_id="counting-v1")
    assert N <= data.reads() <= N + SLACK
    again = build(prefix, data, tmp_path, dataset_id="counting-v1")
    assert again.telemetry["hit"] is True and data.reads() == 0


@pytest.mark.parametrize("item", [0, 17, N - 1])  # a probed item, one that is not, the last
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_changed_item_after_a_hit_rebuilds(tmp_path, item, tier):
    # Data of this test only: the nearest cache seen before (which the reason names) is its own.
    prefix, data = CountingPrefix(), Counting(seed=1000 + item + len(tier))
    build(prefix, data, tmp_path, tier)
    assert build(prefix, data, tmp_path, tier).telemetry["hit"] is True
    data.X[item] += 1.0
    rebuilt = build(prefix, data, tmp_path, tier)
    assert rebuilt.telemetry["hit"] is False
    assert rebuilt.telemetry["reason"] == "rebuilt: the data changed"
    torch.testing.assert_close(rows(rebuilt), expected(prefix, data))
    data.y[item] = (data.y[item] + 1) % 3  # a label alone
    relabelled = build(prefix, data, tmp_path, tier)
    assert relabelled.telemetry["hit"] is False and torch.equal(relabelled.labels, data.y)


def test_a_changed_item_without_a_cache_of_it_in_this_process_rebuilds(tmp_path):
    """The cheap key found no cache of the old data (dropped from the registry): the new data
    are built once and the old cache is not taken for them."""
    prefix, data = CountingPrefix(), Counting()
    old = build(prefix, data, tmp_path)
    data.X[17] += 1.0
    new = build(prefix, data, tmp_path)
    assert new.telemetry["hit"] is False and new.fingerprint != old.fingerprint
    torch.testing.assert_close(rows(new), expected(prefix, data))


def test_random_augmentation_inside_the_dataset_is_refused_in_one_pass(tmp_path):
    class Augmenting(Counting):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x + torch.randn(6) * 0.1, y

    with pytest.raises(DataError, match=r"sample 0 of the dataset .* is not what it was"):
        build(CountingPrefix(), Augmenting(), tmp_path)


def test_a_dataloader_with_its_own_collate_is_read_once(tmp_path):
    data = Counting()
    loader = DataLoader(
        data, batch_size=8, collate_fn=lambda items: tuple(map(torch.stack, zip(*items)))
    )
    prefix = CountingPrefix()
    first = build(prefix, loader, tmp_path)
    assert first.telemetry["hit"] is False
    assert N <= data.reads() <= N + 2 * 8  # the first and last batches are probed
    torch.testing.assert_close(rows(first), expected(prefix, data))
    assert build(prefix, loader, tmp_path).telemetry["hit"] is True
    assert N <= data.reads() <= N + 2 * 8


def test_fit_on_a_dataset_reads_each_item_once_on_a_miss_and_at_most_once_on_a_hit():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    data = Counting()
    costs = []
    for dataset_id in (None, None, "counting-v1", "counting-v1"):
        ft = fastft.FineTuner(copy.deepcopy(backbone), num_classes=3, verbose=False, cache="host")
        ft.fit(data, epochs=1, batch_size=8, dataset_id=dataset_id)
        costs.append((ft.cache.telemetry["hit"], data.reads()))
    (miss, miss_reads), (hit, hit_reads), _, (id_hit, id_reads) = costs
    assert (miss, hit, id_hit) == (False, True, True)
    assert N <= miss_reads <= N + FIT_SLACK and N <= hit_reads <= N + FIT_SLACK
    assert id_reads <= FIT_SLACK - SLACK  # the model's input shape only: nothing is hashed
    registry.clear()


def test_an_auto_build_that_needs_the_disk_reads_once_and_is_found_again(tmp_path):
    """'auto' learns that the cache does not fit in memory only after its first chunk: the
    disk build goes on hashing, and its folder is renamed to its key at the end."""
    prefix, data = CountingPrefix(), Counting()
    first = build(prefix, data, tmp_path, "auto", max_memory=1)
    assert first.tier == "disk" and first.telemetry["hit"] is False
    assert N <= data.reads() <= N + SLACK
    assert first.path.name == first.fingerprint
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [first.fingerprint]
    torch.testing.assert_close(rows(first), expected(prefix, data))
    registry.clear()  # as in a new process
    again = build(prefix, data, tmp_path, "auto", max_memory=1)
    assert again.telemetry["hit"] is True and again.fingerprint == first.fingerprint
    assert N <= data.reads() <= N + SLACK
    assert build(prefix, data, tmp_path, "host").fingerprint == first.fingerprint


class Failing(CountingPrefix):
    """Raises (as a Ctrl-C would) on its ``fail_at``-th call."""

    fastft_key_ignore = ("calls", "fail_at")

    def __init__(self, fail_at=None):
        torch.manual_seed(0)
        super().__init__()
        self.fail_at = fail_at

    def forward(self, x):
        if self.calls + 1 == self.fail_at:
            raise KeyboardInterrupt("injected")
        return super().forward(x)


def test_a_disk_miss_reads_each_item_once(tmp_path):
    prefix, data = CountingPrefix(), Counting()
    first = build(prefix, data, tmp_path, "disk")
    assert first.telemetry["hit"] is False and N <= data.reads() <= N + SLACK
    assert first.path.name == first.fingerprint and not (first.path / "units.bin").exists()
    torch.testing.assert_close(rows(first), expected(prefix, data))
    registry.clear()  # as in a new process: found on disk by its key
    again = build(prefix, data, tmp_path, "disk")
    assert again.telemetry["hit"] is True and again.fingerprint == first.fingerprint
    assert N <= data.reads() <= N + SLACK


# Unchanged; an item of committed chunk 0; a probed item (another pending key: built anew); an
# item not built yet.
@pytest.mark.parametrize("change, kept", [(None, 24), (3, 16), (1, 0), (30, 24)])
def test_an_interrupted_disk_build_resumes_only_what_still_hashes_the_same(tmp_path, change, kept):
    data = Counting(seed=2000 + (change or 0))
    with pytest.raises(KeyboardInterrupt):
        build(Failing(fail_at=4), data, tmp_path, "disk")  # chunks 0..2 (24 rows) committed
    if change is not None:
        data.X[change] += 1.0
    data.reads()
    prefix = Failing()
    cache = build(prefix, data, tmp_path, "disk")
    if kept:
        assert cache.telemetry["reason"] == f"resumed: {kept} of {N} rows were already committed"
    assert prefix.calls == (N - kept) // 8
    torch.testing.assert_close(rows(cache), expected(prefix, data))
    assert torch.equal(cache.labels, data.y) and cache.path.name == cache.fingerprint
    assert data.reads() <= 2 * N + SLACK  # resuming hashes every item, then builds the rest
    registry.clear()
    assert build(Failing(), data, tmp_path, "disk").telemetry["hit"] is True
