"""Trust: the cache holds exactly the samples the user's data describe, never others.

A DataLoader's sampler decides which samples are cached (a validation split stays apart from
the training split), samplers that draw a different set each epoch are refused, a loader's
batch size is used or reported, and a dataset whose items change between reads is caught.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from fastft import FineTuner
from fastft.cache import FeatureCache
from fastft.errors import DataError

pytestmark = pytest.mark.usefixtures("fresh_registry")


def dataset(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    X[:, 0] = torch.arange(n, dtype=torch.float32)  # each sample carries its index
    return TensorDataset(X, torch.randint(0, 3, (n,), generator=g))


def build(data, tmp_path, **kw):
    return FeatureCache.build(
        nn.Identity(),
        data,
        dtype="fp32",
        tier="host",
        cache_dir=tmp_path,
        progress=False,
        batch_size=16,
        **kw,
    )


def cached_indices(cache) -> list[int]:
    (rows,) = cache.gather(torch.arange(cache.num_rows))
    return rows[:, 0].long().tolist()


# ---------------------------------------------------------------------------- samplers
@pytest.mark.reliability(
    "fit(DataLoader(ds, sampler=SubsetRandomSampler(idx[:80])), val=DataLoader(ds, "
    "sampler=SubsetRandomSampler(idx[80:])))",
    "the train cache holds the 80 sampled samples, the val cache the other 20: disjoint, "
    "different keys; evaluate(subset loader) scores its 20 only",
)
def test_a_sampler_split_never_leaks(tmp_path):
    ds = dataset()
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    train = DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(idx[:80]))
    val = DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(idx[80:]))
    torch.manual_seed(0)
    ft = FineTuner(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
        num_classes=3,
        cache="host",
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.fit(train, val=val, epochs=1)
    assert ft.cache.num_rows == 80
    val_cache = ft.build_cache(val, evaluation=True)
    assert val_cache.num_rows == 20 and val_cache.fingerprint != ft.cache.fingerprint
    # Rows are the samples in index order, with their own labels.
    ds_X, ds_y = ds.tensors
    for cache, chosen in ((ft.cache, sorted(idx[:80])), (val_cache, sorted(idx[80:]))):
        prefix_rows = ft.prefix(ds_X[chosen])[0]
        (rows,) = cache.gather(torch.arange(cache.num_rows))
        torch.testing.assert_close(rows, prefix_rows)
        assert torch.equal(cache.labels, ds_y[chosen])
    with torch.no_grad():
        logits = ft.export()(ds_X[sorted(idx[80:])])
    accuracy = (logits.argmax(1) == ds_y[sorted(idx[80:])]).double().mean().item()
    assert ft.evaluate(val)["accuracy"] == pytest.approx(accuracy)


def test_every_form_of_the_same_samples_holds_the_same_rows(tmp_path):
    ds = dataset()
    X, y = ds.tensors
    sub = [3, 7, 50, 51, 99]
    for data, want in [
        ((X, y), list(range(100))),
        (ds, list(range(100))),
        (DataLoader(ds, batch_size=7), list(range(100))),
        (DataLoader(ds, batch_size=7, shuffle=True), list(range(100))),
        (DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler(sub[::-1])), sub),
        (DataLoader(ds, batch_size=2, sampler=list(reversed(sub))), sub),
    ]:
        assert cached_indices(build(data, tmp_path)) == want


@pytest.mark.parametrize(
    "sampler", ["weighted", "replacement", "num_samples", "distributed", "changing"]
)
@pytest.mark.reliability(
    "a DataLoader whose sampler draws a different set each epoch (weighted, with replacement, "
    "num_samples, DistributedSampler, a custom one)",
    "DataError saying why and what to pass instead; nothing cached",
)
def test_samplers_that_change_their_samples_are_refused(tmp_path, sampler):
    ds = dataset()

    class Changing(torch.utils.data.Sampler):
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            self.epoch += 1
            return iter(range(self.epoch, 50 + self.epoch))

        def __len__(self):
            return 50

    make = {
        "weighted": lambda: WeightedRandomSampler(torch.ones(100), 100),
        "replacement": lambda: RandomSampler(ds, replacement=True),
        "num_samples": lambda: RandomSampler(ds, num_samples=40),
        "distributed": lambda: DistributedSampler(ds, num_replicas=2, rank=0),
        "changing": Changing,
    }
    with pytest.raises(DataError, match="sampler.*fastft caches a fixed set of samples"):
        build(DataLoader(ds, batch_size=10, sampler=make[sampler]()), tmp_path)
    assert [p for p in tmp_path.iterdir() if p.name != ".locks"] == []


def test_a_custom_batch_sampler_is_refused_with_what_to_do(tmp_path):
    ds = dataset()
    loader = DataLoader(ds, batch_sampler=[[0, 1], [2, 3]])  # a user's own batches (bucketing, say)
    with pytest.raises(DataError, match="custom batch_sampler.*batch_size="):
        build(loader, tmp_path)


# ---------------------------------------------------------------------------- a loader's batch size
@pytest.mark.reliability(
    "fit(DataLoader(..., batch_size=8)) without batch_size=, and with another one",
    "trains in the loader's batches of 8; a different fit batch_size warns that the loader's "
    "only reads the samples",
)
def test_a_loaders_batch_size_is_used_or_reported(tmp_path):
    ds = dataset(n=40)
    torch.manual_seed(0)
    ft = FineTuner(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
        num_classes=3,
        cache="host",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.fit(DataLoader(ds, batch_size=8), epochs=1)
    assert ft.fit_config.batch_size == 8
    with pytest.warns(
        UserWarning, match=r"fit\(batch_size=20\).*DataLoader's batch_size=8 only reads"
    ):
        ft.fit(DataLoader(ds, batch_size=8), epochs=1, batch_size=20)
    assert ft.fit_config.batch_size == 20


def test_drop_last_is_reported_and_every_sample_is_kept(tmp_path):
    ds = dataset(n=45)
    with pytest.warns(UserWarning, match="drop_last=True is ignored"):
        cache = build(DataLoader(ds, batch_size=10, drop_last=True), tmp_path)
    assert cache.num_rows == 45


def test_the_frozen_pass_reads_in_the_loaders_own_batches(tmp_path):
    """A collate function that pads to the longest item of its batch sees the batches it
    would see in the user's loop (the cache is keyed by what it produced)."""
    ds = [(torch.ones(1 + i % 5), i % 3) for i in range(20)]
    seen = []

    def pad(items):
        seen.append(len(items))
        longest = max(x.shape[0] for x, _ in items)
        X = torch.stack([nn.functional.pad(x, (0, longest - x.shape[0])) for x, _ in items])
        return X.sum(1, keepdim=True), torch.tensor([c for _, c in items])

    cache = build(DataLoader(ds, batch_size=6, collate_fn=pad), tmp_path)
    assert cache.num_rows == 20 and set(seen) == {6, 2}


# ---------------------------------------------------------------------------- data that change
class Augmenting(Dataset):
    """Random augmentation inside __getitem__ (as torchvision datasets with a random transform)."""

    def __init__(self, n=40):
        self.X = torch.randn(n, 6)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + torch.randn(6) * 0.1, i % 3


@pytest.mark.reliability(
    "a Dataset whose items change on every read (random augmentation in __getitem__)",
    "DataError naming the sample and saying to use transform=/views= or dataset_id=, "
    "instead of a cache under a key that describes other values",
)
def test_a_dataset_that_changes_between_reads_is_refused(tmp_path):
    with pytest.raises(
        DataError, match=r"sample 0 of the dataset \(dataset\[0\]\) is not what it was.*transform="
    ):
        build(Augmenting(), tmp_path)
    cache = build(Augmenting(), tmp_path, dataset_id="one-draw")  # knowingly: one draw, no hashing
    assert cache.num_rows == 40


@pytest.mark.parametrize(
    "what", ["an item", "a label", "the collate function", "the sampled subset"]
)
@pytest.mark.reliability(
    "a Dataset item, a label, a DataLoader's collate_fn or its sampler's subset changed",
    "the cache is rebuilt with the new samples",
)
def test_changed_data_rebuild(tmp_path, what):
    ds = dataset()
    X, y = ds.tensors

    def collate(items, shift=0.0):
        return torch.stack([x for x, _ in items]) + shift, torch.stack([c for _, c in items])

    def loader(shift=0.0, subset=(1, 2, 3, 4)):
        return DataLoader(
            ds,
            batch_size=4,
            collate_fn=lambda b: collate(b, shift),
            sampler=SubsetRandomSampler(list(subset)),
        )

    before = build(loader(), tmp_path)
    assert build(loader(), tmp_path).telemetry["hit"] is True
    if what == "an item":
        X[2, 3] += 1
        after = build(loader(), tmp_path)
    elif what == "a label":
        y[3] = (y[3] + 1) % 3
        after = build(loader(), tmp_path)
        assert torch.equal(after.labels, y[[1, 2, 3, 4]])
    elif what == "the collate function":
        after = build(loader(shift=1.0), tmp_path)
    else:
        after = build(loader(subset=(1, 2, 3, 5)), tmp_path)
    assert after.telemetry["hit"] is False and after.fingerprint != before.fingerprint


def test_a_sampler_of_other_keys_than_indices_is_a_clear_error(tmp_path):
    ds = dataset(n=10)
    with pytest.raises(DataError, match="something other than sample indices"):
        build(DataLoader(ds, batch_size=2, sampler=["a", "b"]), tmp_path)
