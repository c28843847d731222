"""fastft.data: every accepted form of data yields the same (inputs, labels) batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastft import data as fdata
from fastft.errors import DataError


class Pairs(Dataset):
    """A map-style dataset of (input, label) items; inputs are tensors or dicts of tensors."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = {k: v[i] for k, v in self.X.items()} if isinstance(self.X, dict) else self.X[i]
        return x, int(self.y[i])


def tensors(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.arange(n) % 4


def collect(batches):
    xs, ys = zip(*batches)
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}, torch.cat(ys)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("form", ["tensors", "dataset", "loader"])
def test_every_form_yields_the_same_samples_in_order(form):
    X, y = tensors()
    data = {
        "tensors": (X, y),
        "dataset": Pairs(X, y),
        "loader": DataLoader(TensorDataset(X, y), batch_size=4),
    }[form]
    got_x, got_y = collect(fdata.as_batches(data, 4))
    torch.testing.assert_close(got_x, X)
    assert torch.equal(got_y, y)
    assert fdata.dataset_length(data) == 10


def test_dict_inputs_are_collated_and_selected():
    ids = torch.arange(20).reshape(10, 2)
    X = {"input_ids": ids, "attention_mask": torch.ones(10, 2, dtype=torch.long)}
    y = torch.arange(10)
    batches = list(fdata.as_batches(Pairs(X, y), 4))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(batches[1][0]["input_ids"], ids[4:8])
    picked = fdata.index_select(X, torch.tensor([3, 1]))
    assert torch.equal(picked["input_ids"], ids[[3, 1]])
    moved = fdata.to_device(X, "cpu")
    assert moved["input_ids"] is ids  # no copy when already there


def test_shuffled_batches_cover_every_sample_once():
    X, y = tensors(13)
    got_x, got_y = collect(fdata.as_batches((X, y), 5, shuffle=True))
    assert sorted(got_y.tolist()) == sorted(y.tolist())
    assert not torch.equal(got_x, X)


@pytest.mark.reliability("empty dataset, X/y of different lengths", "DataError saying which")
def test_empty_and_mismatched_data_are_rejected():
    with pytest.raises(DataError, match="empty"):
        fdata.dataset_length((torch.zeros(0, 3), torch.zeros(0)))
    with pytest.raises(DataError, match="10 samples but y has 9"):
        list(fdata.as_batches((torch.zeros(10, 3), torch.zeros(9)), 4))
    with pytest.raises(DataError, match="different lengths"):
        fdata.dataset_length(({"a": torch.zeros(3, 1), "b": torch.zeros(4, 1)}, torch.zeros(3)))
    with pytest.raises(DataError, match="empty"):
        list(fdata.as_batches(Pairs(torch.zeros(0, 2), torch.zeros(0)), 4))


@pytest.mark.reliability(
    "dataset items that are not (input, label)", "DataError naming the expected form"
)
def test_items_that_are_not_pairs_are_rejected():
    class Bare(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3)

    with pytest.raises(DataError, match=r"\(input, label\)"):
        list(fdata.as_batches(Bare(), 2))
    with pytest.raises(DataError, match="unsupported data"):
        fdata.dataset_length(42)


def test_sample_hash_is_stable_and_sees_every_byte():
    X, y = tensors()
    h = fdata.sample_hash((X, y))
    assert h == fdata.sample_hash((X.clone(), y.clone()))
    X.data[3, 1] += 1e-6  # even a change that bypasses the version counter is seen
    assert fdata.sample_hash((X, y)) != h
    y2 = y.clone()
    y2[0] = 3
    assert fdata.sample_hash((X, y2)) != fdata.sample_hash((X, y))
    # A Dataset and a DataLoader over it hash the same items, whatever the loader's order.
    ds = Pairs(X, y)
    assert fdata.sample_hash(ds) == fdata.sample_hash(DataLoader(ds, batch_size=3, shuffle=True))


def test_iter_range_and_all_labels():
    X, y = tensors()
    for data in [(X, y), Pairs(X, y)]:
        got_x, got_y = collect(fdata.iter_range(data, 2, 9, 3))
        torch.testing.assert_close(got_x, X[2:9])
        assert torch.equal(fdata.all_labels(data), y)
