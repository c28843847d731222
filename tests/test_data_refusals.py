"""Data a cache cannot be built from is refused before the model runs, with a DataError that
says what is wrong with it: one row per form of bad data, through FeatureCache.build."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastft.cache import FeatureCache
from fastft.errors import DataError

pytestmark = pytest.mark.usefixtures("fresh_registry")

X = torch.randn(6, 3)
Y = torch.arange(6) % 2


class Items(Dataset):
    def __init__(self, item, n=6):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(i)


class Prefix(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x["a"] if isinstance(x, dict) else x)


BAD = [
    ("X and y lengths", (X, Y[:5]), "X has 6 samples but y has 5"),
    ("y without a batch axis", (X, torch.tensor(1)), "X has 6 samples but y has -1"),
    ("empty", (X[:0], Y[:0]), "the dataset is empty: X and y have no samples"),
    ("0-d inputs", (torch.tensor(1.0), Y), "inputs must have a batch dimension"),
    ("empty dict", ({}, Y), "inputs is an empty dict"),
    ("dict of a list", ({"a": X, "b": [1] * 6}, Y), r"inputs\['b'\] is a list; dict inputs"),
    ("dict lengths", ({"a": X, "b": X[:4]}, Y), "different lengths: {'a': 6, 'b': 4}"),
    ("a number", 42, "unsupported data of type int"),
    ("a string", "train.csv", "samples 0..8 .* must yield .input, label. pairs; got str"),
    ("empty Dataset", Items(lambda i: (X[i], Y[i]), n=0), "nothing to run the model on"),
    ("items not pairs", Items(lambda i: (X[i], Y[i], i)), "must yield .input, label. pairs"),
    ("item not a tensor", Items(lambda i: ("text", Y[i])), "inputs must be a tensor or a dict"),
    ("labels", Items(lambda i: (X[i], object())), "labels of type object cannot become a tensor"),
    ("ragged", Items(lambda i: (X[i, : 1 + i % 2], Y[i])), "could not stack dataset items"),
]


@pytest.mark.parametrize("data, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_data_is_refused_with_what_is_wrong(tmp_path, data, message):
    torch.manual_seed(0)
    with pytest.raises(DataError, match=message):
        FeatureCache.build(
            Prefix(), data, dtype="fp32", tier="host", cache_dir=tmp_path, progress=False
        )


def test_a_dict_batch_with_a_labels_entry_is_split_into_inputs_and_labels(tmp_path):
    loader = DataLoader(Items(lambda i: {"a": X[i], "labels": Y[i]}), batch_size=4)
    torch.manual_seed(0)
    cache = FeatureCache.build(
        Prefix(), loader, dtype="fp32", tier="host", cache_dir=tmp_path, progress=False
    )
    assert torch.equal(cache.labels, Y)


def test_a_dataloader_with_drop_last_counts_only_whole_batches():
    from fastft.data import dataset_length

    assert dataset_length(DataLoader(Items(lambda i: (X[i], Y[i])), batch_size=4)) == 6
    dropped = DataLoader(Items(lambda i: (X[i], Y[i])), batch_size=4, drop_last=True)
    assert dataset_length(dropped) == 4
