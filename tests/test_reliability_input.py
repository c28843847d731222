"""Bad input to a cache build or a fit: clear errors that name the samples, never a bare
traceback from deep inside PyTorch or a cache of the wrong rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fastft
from fastft import DataError, FeatureCache

from helpers.data import Rows

pytestmark = pytest.mark.usefixtures("fresh_registry")


def prefix():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh())


def build(data, tmp_path, **kw):
    kw.setdefault("tier", "host")
    return FeatureCache.build(
        kw.pop("prefix", None) or prefix(),
        data,
        dtype="fp32",
        batch_size=10,
        cache_dir=tmp_path,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.reliability(
    "inputs of the wrong shape for the model ([N, 7] into Linear(6, ...))",
    "DataError naming samples 0..9 and the input shape, the RuntimeError as its cause",
)
def test_wrong_input_shape_names_the_samples_and_shape(tmp_path, tier):
    X, y = torch.randn(40, 7), torch.randint(0, 3, (40,))
    with pytest.raises(
        DataError, match=r"frozen prefix failed on samples 0\.\.9 with inputs \[10, 7\] float32"
    ) as info:
        build((X, y), tmp_path, tier=tier)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "mat1 and mat2" in str(info.value)  # the original message is kept


@pytest.mark.reliability(
    "inputs of the wrong dtype (int64 into a float model)",
    "DataError naming the samples and 'int64', the original error as its cause",
)
def test_wrong_input_dtype_names_the_dtype(tmp_path):
    X, y = torch.randint(0, 5, (40, 6)), torch.randint(0, 3, (40,))
    with pytest.raises(DataError, match=r"samples 0\.\.9 with inputs \[10, 6\] int64") as info:
        build((X, y), tmp_path)
    assert info.value.__cause__ is not None


@pytest.mark.reliability(
    "dict inputs whose model raises (a tokenizer output missing a key)",
    "DataError listing each key's shape and dtype",
)
def test_dict_inputs_are_described_key_by_key(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)

        def forward(self, batch):
            return self.emb(batch["input_ids"]).mean(1) * batch["token_type_ids"]

    X = {"input_ids": torch.randint(0, 50, (30, 5)), "attention_mask": torch.ones(30, 5)}
    with pytest.raises(
        DataError,
        match=r"\{'input_ids': \[10, 5\] int64 on cpu, 'attention_mask': \[10, 5\] float32",
    ):
        build((X, torch.zeros(30, dtype=torch.long)), tmp_path, prefix=Encoder())


@pytest.mark.reliability(
    "one malformed sample (shape [7] among [6]) in the 4th batch of a Dataset",
    "DataError naming samples 30..39 and why they could not be stacked",
)
def test_malformed_sample_names_its_batch(tmp_path):
    X = [torch.randn(6) for _ in range(50)]
    X[37] = torch.randn(7)
    with pytest.raises(DataError, match=r"loading samples 30\.\.39 .*could not stack"):
        build(Rows(X, torch.zeros(50, dtype=torch.long)), tmp_path, dataset_id="malformed")


@pytest.mark.reliability(
    "a random transform that raises on a batch",
    "DataError 'the transform failed on samples ...' with the original as cause",
)
def test_failing_transform_is_named(tmp_path):
    def transform(x):
        if x.shape[0] < 10:
            raise ValueError("too few")
        return x + 0.1 * torch.randn_like(x)

    X, y = torch.randn(25, 6), torch.randint(0, 3, (25,))
    with pytest.raises(
        DataError, match=r"the transform failed on samples 20\.\.24 \(view 0\)"
    ) as info:
        build((X, y), tmp_path, views=2, transform=transform)
    assert isinstance(info.value.__cause__, ValueError)


# ---------------------------------------------------------------------------- lengths that change
class Drifting(Rows):
    """A Dataset whose __len__ answers differently from some call on."""

    def __init__(self, X, y, lengths):
        super().__init__(X, y)
        self.lengths, self.calls = lengths, 0

    def __len__(self):
        self.calls += 1
        return self.lengths(self.calls)


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.reliability(
    "a Dataset whose __len__ grows between calls (100, then 101)",
    "DataError 'length changed from 100 to 101'; nothing cached",
)
def test_dataset_whose_length_grows_is_refused(tmp_path, tier):
    X, y = torch.randn(101, 6), torch.randint(0, 3, (101,))
    data = Drifting(X, y, lambda k: 100 if k == 1 else 101)
    with pytest.raises(DataError, match="length changed from 100 to 101"):
        build(data, tmp_path, tier=tier, dataset_id="grows")
    assert [p for p in tmp_path.iterdir() if p.name != ".locks"] == []  # no folder was started


@pytest.mark.reliability(
    "a Dataset that shrinks during the build (len 100, then 60: items past 60 raise IndexError)",
    "DataError naming the samples that failed and the length change",
)
def test_dataset_that_shrinks_mid_build_is_named(tmp_path):
    X, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    state = {"len": 100}

    class Shrinking(Rows):
        def __len__(self):
            return state["len"]

        def __getitem__(self, i):
            if i >= state["len"]:
                raise IndexError(i)
            if i == 35:
                state["len"] = 60  # someone deleted files while the cache was built
            return super().__getitem__(i)

    with pytest.raises(DataError, match=r"loading samples 60\.\.69 .*changed from 100 to 60"):
        build(Shrinking(X, y), tmp_path, tier="disk", dataset_id="shrinks")


@pytest.mark.reliability(
    "a DataLoader whose dataset grows during the build (yields more samples than its len())",
    "DataError 'yielded more than the N samples'; no row written past the cache",
)
def test_loader_yielding_more_than_its_length_is_refused(tmp_path):
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    data = Drifting(X, y, lambda k: 50 if k <= 3 else 60)  # the loader's own iteration sees 60
    with pytest.raises(DataError, match="more than the 50 samples|length changed from 50 to 60"):
        build(DataLoader(data, batch_size=10), tmp_path, tier="disk", dataset_id="loader-grows")


@pytest.mark.reliability(
    "labels out of range for num_classes in FineTuner.fit",
    "DataError naming the label, the sample and num_classes",
)
def test_labels_out_of_range_are_named(tmp_path):
    if not hasattr(fastft, "FineTuner"):
        pytest.skip("fastft.FineTuner has not landed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    X, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    y[17] = 7
    ft = (
        fastft.FineTuner(model, num_classes=3, cache_dir=tmp_path)
        if "cache_dir" in fastft.FineTuner.__init__.__code__.co_varnames
        else fastft.FineTuner(model, num_classes=3)
    )
    with pytest.raises(DataError, match=r"label 7 of sample 17.*num_classes=3"):
        ft.fit((X, y), epochs=1)
