"""FeatureCache: the frozen prefix runs once per sample, and what is cached is what it computed.

Prefix calls are counted with a wrapper module to prove reuse; gathered rows are compared to
a direct computation with the reference pooling and casts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastft.cache import FeatureCache, registry
from fastft.cache.fingerprint import PART_NAMES
from fastft.cache.layout import _check_fits
from fastft.errors import CacheTooLargeError, DataError, FastFTIndexError, FastFTValueError
from fastft.ops.reference import pool_rows, quantize_int8

from helpers.data import labelled

pytestmark = pytest.mark.usefixtures("fresh_registry")


class Counting(nn.Module):
    """Wraps a frozen prefix and counts its calls (the count is not part of the cache key)."""

    fastft_key_ignore = ("calls",)

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def cnn(seed=0) -> Counting:
    torch.manual_seed(seed)
    return Counting(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))


def images(n=40, seed=1):
    return labelled(n, (3, 6, 6), classes=5, seed=seed)


def build(prefix, data, tmp_path, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("progress", False)
    return FeatureCache.build(prefix, data, cache_dir=tmp_path, **kw)


def direct(prefix, X, pool):
    """What the cache must hold: the prefix in eval mode, pooled like the reference (fp64)."""
    prefix.eval()
    with torch.no_grad():
        out = prefix(X)
    if pool == "none":
        return out.reshape(len(X), -1).double()
    return pool_rows(out.flatten(2).transpose(1, 2), pool, dtype=torch.float64)


# ---------------------------------------------------------------------------- values
@pytest.mark.parametrize("pool", ["none", "mean", "max", "first"])
def test_fp32_cache_holds_exactly_the_prefix_output(tmp_path, pool):
    prefix, (X, y) = cnn(), images()
    cache = build(prefix, (X, y), tmp_path, dtype="fp32", pool=pool)
    rows = torch.tensor([5, 0, 39, 17])
    (got,) = cache.gather(rows)
    torch.testing.assert_close(got.double(), direct(prefix, X, pool)[rows], rtol=1e-6, atol=1e-6)
    assert torch.equal(cache.labels, y)
    assert cache.num_rows == 40 and cache.num_views == 1
    tap = cache.taps[0]
    assert tap.shape == ((8, 6, 6) if pool == "none" else (8,)) and tap.dtype == torch.float32
    if pool == "none":  # the tail gets its activation back in its own shape
        (shaped,) = cache.gather_shaped(rows)
        assert shaped.shape == (4, 8, 6, 6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_round_trip_error_is_that_of_the_storage_dtype(tmp_path, dtype):
    prefix, (X, y) = cnn(), images()
    cache = build(prefix, (X, y), tmp_path, dtype=dtype, pool="mean")
    want = direct(prefix, X, "mean").float()
    (got,) = cache.gather(torch.arange(40))
    if dtype == "int8":
        q, scale = quantize_int8(want)
        # within half a quantization step of the exact value (plus float rounding)
        assert bool(((got - want).abs() <= scale.unsqueeze(1) / 2 + 1e-6).all())
        torch.testing.assert_close(got, q.float() * scale.unsqueeze(1), rtol=0, atol=1e-6)
    else:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        # a single round-to-nearest cast, so exactly what PyTorch's cast gives
        assert torch.equal(got, want.to(torch_dtype).float()) or torch.allclose(
            got,
            want.to(torch_dtype).float(),
            rtol=0,
            atol=torch.finfo(torch_dtype).eps * want.abs().max(),
        )


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_every_tier_returns_identical_rows(tmp_path, dtype):
    prefix, (X, y) = cnn(), images()
    rows = torch.randperm(40)[:25]
    got = {}
    for tier in ["host", "device", "disk"]:
        registry.clear()
        cache = build(prefix, (X, y), tmp_path / tier, dtype=dtype, tier=tier)
        assert cache.tier == tier
        assert (cache.path is not None) == (tier == "disk")
        got[tier] = cache.gather(rows, out_dtype=torch.float32)[0]
    assert torch.equal(got["host"], got["device"]) and torch.equal(got["host"], got["disk"])


def test_several_taps_and_sequence_inputs_with_masked_mean(tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 12)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, inputs):
            h = self.emb(inputs["input_ids"])
            return h, h.mean(dim=1)  # a sequence tap [B, L, D] and a pooled one [B, D]

    ids = torch.randint(0, 50, (30, 7))
    mask = (torch.arange(7) < torch.randint(1, 8, (30, 1))).long()
    y = torch.arange(30) % 3
    cache = build(
        Encoder(),
        ({"input_ids": ids, "attention_mask": mask}, y),
        tmp_path,
        dtype="fp32",
        pool="masked_mean",
    )
    seq, pooled = cache.gather(torch.arange(30))
    with torch.no_grad():
        h = emb(ids)
    torch.testing.assert_close(seq, pool_rows(h, "masked_mean", mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, h.mean(dim=1), rtol=1e-6, atol=1e-6)
    assert [t.name for t in cache.taps] == ["tap0", "tap1"]


def test_datasets_and_loaders_give_the_same_cache(tmp_path):
    prefix, (X, y) = cnn(), images()

    class Pairs(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return X[i], y[i]

    want = build(prefix, (X, y), tmp_path, dtype="fp32", tier="host").gather(torch.arange(40))[0]
    for data in [Pairs(), DataLoader(TensorDataset(X, y), batch_size=7, shuffle=True)]:
        registry.clear()
        cache = build(prefix, data, tmp_path, dtype="fp32", tier="host")
        # a shuffling loader is read in dataset order: row i is sample i
        assert torch.equal(cache.gather(torch.arange(40))[0], want)
        assert torch.equal(cache.labels, y)


# ---------------------------------------------------------------------------- reuse and keys
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_same_key_is_reused_without_running_the_prefix(tmp_path, tier):
    prefix, data = cnn(), images()
    first = build(prefix, data, tmp_path, tier=tier)
    calls = prefix.calls
    assert calls == 3 and first.telemetry["hit"] is False
    second = build(prefix, data, tmp_path, tier=tier)
    assert prefix.calls == calls
    assert second.telemetry["hit"] is True and second.telemetry["reason"].startswith("hit")
    assert second.fingerprint == first.fingerprint
    assert first.telemetry["hit"] is False  # the first cache keeps its own telemetry
    if tier == "disk":  # a new process (no registry) reuses the disk cache too
        registry.clear()
        third = build(prefix, data, tmp_path, tier=tier)
        assert prefix.calls == calls and third.telemetry["hit"] is True


def _changes():
    def weights(p, d):
        with torch.no_grad():
            p.inner[0].weight[0, 0, 0, 0] += 1e-3
        return p, d, {}

    def weights_via_data(p, d):  # bypasses the version counter: must still be seen
        p.inner[1].running_mean.data[3] += 1e-3
        return p, d, {}

    def structure(p, d):
        p.inner[2] = nn.GELU()
        return p, d, {}

    def dataset(p, d):
        X, y = d[0].clone(), d[1]
        X[7, 0, 0, 0] += 1e-3
        return p, (X, y), {}

    def labels(p, d):
        y = d[1].clone()
        y[0] = (y[0] + 1) % 5
        return p, (d[0], y), {}

    return {
        "weights": weights,
        "weights_via_data": weights_via_data,
        "structure": structure,
        "dataset": dataset,
        "labels": labels,
        "transform": lambda p, d: (p, d, {"transform": lambda x: x * 2}),
        "dtype": lambda p, d: (p, d, {"dtype": "bf16"}),
        "pool": lambda p, d: (p, d, {"pool": "max"}),
    }


@pytest.mark.parametrize("what", list(_changes()))
def test_any_change_rebuilds_and_says_why(tmp_path, what):
    prefix, data = cnn(), images()
    build(prefix, data, tmp_path, tier="disk")
    prefix, data, kw = _changes()[what](prefix, data)
    before = prefix.calls
    cache = build(prefix, data, tmp_path, tier="disk", **kw)
    assert prefix.calls == before + 3
    assert cache.telemetry["hit"] is False
    # A plain module's layers are its "modules" part (a split prefix's cut is its structure).
    expected = {"labels": "dataset", "weights_via_data": "weights", "structure": "modules"}.get(
        what, what
    )
    assert cache.telemetry["reason"] == f"rebuilt: {PART_NAMES[expected]} changed"


def test_dataset_id_replaces_the_content_hash(tmp_path):
    prefix, (X, y) = cnn(), images()
    build(prefix, (X, y), tmp_path, dataset_id="train-v1", tier="host")
    cache = build(prefix, (X + 1, y), tmp_path, dataset_id="train-v1", tier="host")
    assert cache.telemetry["hit"] is True and prefix.calls == 3


# ---------------------------------------------------------------------------- views
def noisy(x):
    return x + 0.5 * torch.randn_like(x)  # draws from the global RNG


def noisy_with_generator(x, generator):
    return x + 0.5 * torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("transform", [noisy, noisy_with_generator])
def test_views_are_distinct_real_passes_and_reproducible(tmp_path, transform):
    prefix, (X, y) = cnn(), images()
    cache = build(
        prefix,
        (X, y),
        tmp_path,
        tier="host",
        dtype="fp32",
        pool="mean",
        views=3,
        transform=transform,
        seed=7,
    )
    assert cache.num_views == 3 and prefix.calls == 9  # 3 chunks x 3 views
    rows = torch.arange(40)
    v = [cache.gather(rows, view=k)[0] for k in range(3)]
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[1], v[2])
    # one view per row through a view tensor
    pick = torch.randint(0, 3, (40,))
    mixed = cache.gather(rows, view=pick)[0]
    assert torch.equal(mixed, torch.stack([v[int(k)][i] for i, k in enumerate(pick)]))
    registry.clear()
    again = build(
        prefix,
        (X, y),
        tmp_path,
        tier="host",
        dtype="fp32",
        pool="mean",
        views=3,
        transform=transform,
        seed=7,
    )
    assert again.telemetry["hit"] is False and torch.equal(again.gather(rows, view=2)[0], v[2])
    other = build(
        prefix,
        (X, y),
        tmp_path,
        tier="host",
        dtype="fp32",
        pool="mean",
        views=3,
        transform=transform,
        seed=8,
    )
    assert other.fingerprint != cache.fingerprint and not torch.equal(
        other.gather(rows, view=2)[0], v[2]
    )


def test_gather_rejects_bad_rows_and_views(tmp_path):
    cache = build(cnn(), images(), tmp_path, tier="host", views=2, transform=noisy)
    with pytest.raises(FastFTIndexError):
        cache.gather(torch.tensor([40]))  # would be view 1 of sample 0 without the check
    with pytest.raises(FastFTIndexError):
        cache.gather(torch.tensor([0]), view=2)
    with pytest.raises(FastFTValueError):
        cache.gather(torch.tensor([0.5]))


def test_unchecked_gathers_of_valid_rows_read_the_same(tmp_path):
    cache = build(cnn(), images(), tmp_path, tier="host", views=2, transform=noisy)
    rows, view = torch.tensor([3, 0, 39, 17]), torch.tensor([1, 0, 1, 0])
    for v in (None, 1, view):
        checked = cache.gather_shaped(rows, view=v)
        unchecked = cache.gather_shaped(rows, view=v, check_rows=False)
        for a, b in zip(checked, unchecked):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.reliability(
    "NaN or Inf in the frozen features", "DataError naming the sample; nothing cached"
)
def test_nan_features_name_the_sample(tmp_path):
    prefix, (X, y) = cnn(), images()
    X[21, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="sample 21"):
        build(prefix, (X, y), tmp_path, tier="host")


@pytest.mark.reliability(
    "features too large for fp16 storage", "DataError naming the sample and suggesting bf16/fp32"
)
def test_fp16_overflow_is_not_cached_as_inf(tmp_path):
    prefix, (X, y) = cnn(), images()
    X[3] *= 1e6
    with pytest.raises(DataError, match="sample 3 .*fp16|sample 3 .*float16"):
        build(prefix, (X, y), tmp_path, tier="host", dtype="fp16")
    assert build(prefix, (X, y), tmp_path, tier="host", dtype="bf16").num_rows == 40


def test_bad_arguments_are_rejected(tmp_path):
    prefix, data = cnn(), images()
    with pytest.raises(FastFTValueError, match="dtype"):
        build(prefix, data, tmp_path, dtype="fp8")
    with pytest.raises(FastFTValueError, match="tier"):
        build(prefix, data, tmp_path, tier="gpu")
    with pytest.raises(FastFTValueError, match="transform"):
        build(prefix, data, tmp_path, views=2)
    with pytest.raises(FastFTValueError, match="mask"):
        build(prefix, data, tmp_path, pool="masked_mean")
    assert prefix.calls <= 1


def test_auto_tier_falls_back_to_disk_when_memory_is_short(tmp_path):
    prefix, data = cnn(), images()
    small = build(prefix, data, tmp_path, tier="auto", max_memory="1GB")
    assert small.tier == "host"
    big = build(prefix, data, tmp_path, tier="auto", dtype="fp32", max_memory=1000)
    assert big.tier == "disk" and big.path is not None
    t = big.telemetry
    assert t["rows"] == 40 and t["bytes"] == {"disk": big.nbytes}
    assert t["build_seconds"] >= t["prefix_seconds"] > 0 and t["write_seconds"] > 0


def test_prefix_runs_in_eval_mode_and_keeps_its_mode(tmp_path):
    prefix, (X, y) = cnn(), images()
    prefix.train()
    cache = build(prefix, (X, y), tmp_path, dtype="fp32", pool="mean", tier="host")
    assert prefix.training  # restored
    torch.testing.assert_close(
        cache.gather(torch.arange(40))[0].double(), direct(prefix, X, "mean"), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------------ token ids come back exact
class _IdsPrefix(nn.Module):
    def forward(self, x):
        return x["h"], x["ids"]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_token_ids_come_back_exactly_in_any_out_dtype(dtype, out_dtype, tmp_path):
    """Training under amp='bf16' gathers in bf16, which rounds integers above 256: token ids
    (e.g. 30521) must still come back exact."""
    ids = torch.arange(30500, 30524).view(8, 3)
    data = ({"h": torch.randn(8, 4, 3), "ids": ids}, torch.zeros(8, dtype=torch.long))
    cache = FeatureCache.build(
        _IdsPrefix(),
        data,
        dtype=dtype,
        tier="host",
        progress=False,
        dataset_id="ids",
        cache_dir=str(tmp_path),
    )
    h, got = cache.gather_shaped(torch.arange(8), out_dtype=out_dtype)
    assert got.dtype == torch.int64 and torch.equal(got, ids)
    assert h.dtype == out_dtype and h.shape == (8, 4, 3)
    flat = cache.gather(torch.arange(8), out_dtype=out_dtype)  # gather keeps its out_dtype contract
    assert flat[1].dtype == out_dtype
    torch.testing.assert_close(flat[1], ids.to(out_dtype))


# ---------------------------------------------------------------------------- memory guard
def test_memory_guard_message_names_real_sizes():
    with pytest.raises(CacheTooLargeError) as small:
        _check_fits("host", 131_584, torch.device("cpu"), 1_000)
    text = str(small.value)
    assert "0.00 GiB" not in text and "131,584 bytes" in text and "1,000 bytes" in text
    assert "cache='disk'" in text and "cache='auto'" in text

    with pytest.raises(CacheTooLargeError, match=r"fp16 about 1\.5 GiB, int8 about 0\.75 GiB"):
        _check_fits("host", 3 * 2**30, torch.device("cpu"), 2**30, torch.float32)
    with pytest.raises(CacheTooLargeError) as from_fp16:
        _check_fits("host", 3 * 2**30, torch.device("cpu"), 2**30, torch.float16)
    assert "int8 about 1.5 GiB" in str(from_fp16.value) and "fp16 about" not in str(from_fp16.value)
    with pytest.raises(CacheTooLargeError, match="no smaller cache_dtype"):
        _check_fits("host", 3 * 2**30, torch.device("cpu"), 2**30, torch.int8)
    _check_fits("host", 2**30, torch.device("cpu"), 2**30, torch.float32)  # fits: no error
