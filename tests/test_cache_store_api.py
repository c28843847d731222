"""A built cache's reading API: which rows and views a gather accepts, and what it refuses
with a clear error rather than reading another sample; repr and verify of a memory cache;
storage dtypes and memory sizes as the options take them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastft.cache import FeatureCache
from fastft.cache.layout import dtype_name, parse_bytes
from fastft.errors import FastFTIndexError, FastFTValueError

pytestmark = pytest.mark.usefixtures("fresh_registry")

N = 6


@pytest.fixture
def cache(tmp_path):
    """Three views of six samples, each view shifted by its own random integers."""
    torch.manual_seed(0)
    X = torch.randn(N, 4)

    def shift(x, generator=None):
        return x + torch.randint(0, 10, (x.shape[0], 1), generator=generator).float()

    return FeatureCache.build(
        nn.Linear(4, 3),
        (X, torch.arange(N) % 2),
        dtype="fp32",
        tier="host",
        views=3,
        transform=shift,
        transform_id="shift",
        cache_dir=tmp_path,
        progress=False,
    )


def test_integer_rows_of_any_width_read_the_same_samples(cache):
    c = cache
    want = c.gather(torch.tensor([4, 0]))[0]
    assert torch.equal(c.gather(torch.tensor([4, 0], dtype=torch.int32))[0], want)
    assert torch.equal(c.gather([4, 0])[0], want)


@pytest.mark.parametrize(
    "rows, view, error, message",
    [
        (torch.tensor([[0, 1]]), None, FastFTValueError, r"rows must be 1-D, got shape \(1, 2\)"),
        (torch.tensor([0.0]), None, FastFTValueError, "integer sample indices"),
        (torch.tensor([N]), None, FastFTIndexError, rf"rows\[0\] = {N} is outside"),
        (torch.tensor([N]), 1, FastFTIndexError, rf"rows\[0\] = {N} is outside"),
        (torch.tensor([0]), 3, FastFTIndexError, "view 3 is outside the cache's 3 views"),
        (torch.tensor([0, 1]), torch.tensor([0]), FastFTValueError, "view has shape"),
        (torch.tensor([0, 1]), torch.tensor([0, 3]), FastFTIndexError, "a view index is outside"),
        (torch.tensor([0, N]), torch.tensor([0, 1]), FastFTIndexError, "is outside"),
    ],
    ids=["2-D", "float", "row", "row-in-view", "view", "view-shape", "view-index", "row-of-views"],
)
def test_a_gather_refuses_what_would_read_another_sample(cache, rows, view, error, message):
    c = cache
    with pytest.raises(error, match=message):
        c.gather(rows, view=view)


def test_a_per_row_view_reads_each_rows_own_view(cache):
    c = cache
    rows, views = torch.tensor([2, 4, 2]), torch.tensor([0, 2, 1])
    mixed = c.gather(rows, view=views)[0]
    assert not torch.equal(mixed[0], mixed[2])  # sample 2 in views 0 and 1: they differ
    for i in range(3):
        assert torch.equal(mixed[i], c.gather(rows[i : i + 1], view=int(views[i]))[0][0])


def test_repr_and_verify_of_a_memory_cache(cache):
    c = cache
    text = repr(c)
    assert text.startswith(f"FeatureCache({c.fingerprint[:12]}, tier=host, rows={N}, views=3")
    assert "taps=[tap0[3]:" in text and "MiB)" in text
    report = c.verify()
    assert report["ok"] is True and report["checked"].startswith("nothing: in-memory")


def test_storage_dtypes_by_name_or_torch_dtype():
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name("FP16") == "fp16"
    with pytest.raises(FastFTValueError, match="unknown cache dtype torch.float64"):
        dtype_name(torch.float64)
    with pytest.raises(FastFTValueError, match="unknown cache dtype 'fp8'"):
        dtype_name("fp8")


def test_memory_sizes_as_numbers_or_strings():
    assert parse_bytes(None) is None and parse_bytes(1.5e3) == 1500
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes(" 2 GiB ") == 2 * 2**30
    for bad in ("lots", "12 parsecs", "-1GB"):
        with pytest.raises(FastFTValueError, match="cannot read max_memory"):
            parse_bytes(bad)


def test_a_malformed_number_is_refused_like_any_unreadable_size():
    with pytest.raises(FastFTValueError, match="cannot read max_memory"):
        parse_bytes("1..2GB")
