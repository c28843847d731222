"""What a frozen prefix may return to a cache build: named taps from a dict, and clear
DataErrors for outputs the cache cannot hold (not tensors, no per-sample features,
integers beyond what fp32 stores exactly), naming the samples and the inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastft.cache import FeatureCache
from fastft.cache.activations import as_bld, check_exact, describe_inputs
from fastft.errors import DataError

pytestmark = pytest.mark.usefixtures("fresh_registry")

X = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(10) % 2


class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.fn(self.linear(x))


def build(fn, tmp_path, **kw):
    torch.manual_seed(0)
    kw.setdefault("pool", "none")
    return FeatureCache.build(
        Returns(fn).eval(),
        (X, Y),
        dtype="fp32",
        tier="host",
        cache_dir=tmp_path,
        progress=False,
        batch_size=4,
        **kw,
    )


def test_a_dict_of_taps_is_cached_under_its_keys(tmp_path):
    cache = build(lambda h: {"hidden": h, "score": h.sum(dim=1, keepdim=True)}, tmp_path)
    assert [t.name for t in cache.taps] == ["hidden", "score"]
    hidden, score = cache.gather(torch.arange(10))
    torch.testing.assert_close(score, hidden.sum(dim=1, keepdim=True))


@pytest.mark.parametrize("out", [None, "text", (), [1.0]], ids=["None", "str", "empty", "floats"])
def test_an_output_that_is_not_tensors_is_refused(tmp_path, out):
    with pytest.raises(DataError, match="must return a tensor or a tuple of tensors"):
        build(lambda h: out, tmp_path)


def test_one_number_per_sample_is_kept_whole_whatever_the_pool(tmp_path):
    cache = build(lambda h: h.sum(dim=1), tmp_path, pool="mean")
    (score,) = cache.gather(torch.arange(10))
    with torch.no_grad():
        torch.manual_seed(0)
        expected = Returns(lambda h: h.sum(dim=1)).eval()(X)
    torch.testing.assert_close(score.reshape(-1), expected)
    with pytest.raises(DataError, match=r"shape \(4,\) has no per-sample features"):
        as_bld(torch.zeros(4), "mean")  # so a pooled view of it is never asked for


def test_integers_beyond_fp32s_exact_range_are_refused(tmp_path):
    big = lambda h: torch.full((h.shape[0], 1), 2**24 + 1, dtype=torch.int64)  # noqa: E731
    with pytest.raises(DataError, match=r"holds integers beyond 2\*\*24"):
        build(big, tmp_path)
    exact = build(lambda h: torch.full((h.shape[0], 1), 2**24, dtype=torch.int64), tmp_path)
    assert int(exact.gather(torch.arange(2))[0].max()) == 2**24


def test_check_exact_passes_masks_and_empty_taps():
    check_exact(torch.ones(3, 2, dtype=torch.bool), "mask", 0)
    check_exact(torch.empty(0, dtype=torch.int64), "none", 0)


def test_describe_inputs_says_what_each_entry_is():
    text = describe_inputs({"ids": torch.zeros(2, 5, dtype=torch.int64), "lang": "en"})
    assert text == "{'ids': [2, 5] int64 on cpu, 'lang': str}"
    assert describe_inputs(torch.zeros(3)) == "[3] float32 on cpu"
