"""Batches that disagree with the first one are refused with a DataError naming the samples:
a prefix that changes its taps, labels that change shape or dtype or count, a mask that does
not fit the tap; an error fastft raises inside the prefix passes through as it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from fastft.cache import FeatureCache
from fastft.errors import DataError, FastFTValueError

pytestmark = pytest.mark.usefixtures("fresh_registry")

N, B = 12, 4
X = torch.randn(N, 5, generator=torch.Generator().manual_seed(0))
Y = torch.arange(N) % 2


class Changing(nn.Module):
    """``first(h)`` on the first call, ``later(h)`` on every other."""

    def __init__(self, first, later):
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.first, self.later, self.calls = first, later, 0

    fastft_key_ignore = ("calls",)

    def forward(self, x):
        self.calls += 1
        h = self.linear(x["x"] if isinstance(x, dict) else x)
        return (self.first if self.calls == 1 else self.later)(h)


def build(model, data=(X, Y), **kw):
    kw.setdefault("pool", "none")
    return FeatureCache.build(
        model, data, dtype="fp32", tier="host", progress=False, batch_size=B, **kw
    )


@pytest.mark.parametrize(
    "first, later, message",
    [
        (lambda h: (h, h), lambda h: (h,), "returned 1 taps for samples 4..7 but 2 before"),
        (lambda h: h, lambda h: h[:, :2], r"tap 'tap0' has shape \(4, 2\) for samples 4"),
        (lambda h: h[0, 0], lambda h: h, r"shape \(\); a frozen activation needs \[B, \.\.\.\]"),
    ],
    ids=["tap count", "tap shape", "no batch axis"],
)
def test_a_prefix_whose_taps_change_is_refused(first, later, message):
    torch.manual_seed(0)
    with pytest.raises(DataError, match=message):
        build(Changing(first, later).eval())


class Pairs(Dataset):
    def __init__(self, label):
        self.label = label

    def __len__(self):
        return N

    def __getitem__(self, i):
        return X[i], self.label(i)


def label_dtype_changes(i):
    return int(Y[i]) if i < B else float(Y[i])


def label_shape_changes(i):
    return torch.tensor([1, 0]) if i < B else torch.tensor([1, 0, 0])


@pytest.mark.parametrize(
    "label, dataset_id, message",
    [
        (label_dtype_changes, None, "labels of samples 4..7 have torch.float"),
        (label_shape_changes, "named", r"labels of samples 4\.\.7 have torch.int64 \(3,\)"),
    ],
    ids=["dtype", "shape"],
)
def test_labels_that_change_between_batches_are_refused(label, dataset_id, message):
    torch.manual_seed(0)
    with pytest.raises(DataError, match=message):
        build(nn.Linear(5, 3), DataLoader(Pairs(label), batch_size=B), dataset_id=dataset_id)


def test_labels_whose_shape_changes_are_refused_while_the_data_are_hashed():
    torch.manual_seed(0)
    with pytest.raises(DataError, match="labels of samples 4"):
        build(nn.Linear(5, 3), DataLoader(Pairs(label_shape_changes), batch_size=B))


def test_a_batch_with_too_few_labels_is_refused():
    def drop_one(samples):
        x, y = default_collate(samples)
        return x, y[:-1]

    torch.manual_seed(0)
    loader = DataLoader(Pairs(lambda i: int(Y[i])), batch_size=B, collate_fn=drop_one)
    with pytest.raises(DataError, match="samples 0..3 came as a batch of 3 labels"):
        build(nn.Linear(5, 3), loader)


def test_a_mask_that_does_not_fit_the_tap_is_refused():
    inputs = {"x": X, "attention_mask": torch.ones(N, 7)}
    model = Changing(lambda h: h.unsqueeze(1).expand(-1, 3, -1), None)
    model.later = model.first
    torch.manual_seed(0)
    with pytest.raises(DataError, match=r"tap 'tap0' has 3 positions but the mask has shape"):
        build(model.eval(), (inputs, Y), pool="masked_mean")


def test_masked_mean_without_a_mask_in_the_inputs_is_refused():
    model = Changing(lambda h: h.unsqueeze(1).expand(-1, 3, -1), None)
    model.later = model.first
    torch.manual_seed(0)
    with pytest.raises(FastFTValueError, match=r"inputs\['attention_mask'\], but the inputs are"):
        build(model.eval(), pool="masked_mean")
    with pytest.raises(FastFTValueError, match="have keys 'x'. Pass mask_key="):
        build(model.eval(), ({"x": X}, Y), pool="masked_mean")


def test_a_fastft_error_inside_the_prefix_passes_through_unwrapped():
    def refuse(h):
        raise FastFTValueError("the prefix's own complaint")

    torch.manual_seed(0)
    with pytest.raises(FastFTValueError, match="^the prefix's own complaint$"):
        build(Changing(refuse, refuse).eval())
