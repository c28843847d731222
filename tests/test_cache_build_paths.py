"""Cache build paths no other test takes: settings refused up front, a disk cache loaded
into memory for a host build, a prefix without train/eval modes, a stream that ends early,
and a cache whose key is opaque removed when its process ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fastft.cache import FeatureCache, clear_registry
from fastft.errors import CacheError, FastFTValueError

pytestmark = pytest.mark.usefixtures("fresh_registry")

X = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
Y = torch.arange(12) % 3


def prefix():
    torch.manual_seed(0)
    return nn.Linear(5, 4)


def build(tmp_path, data=(X, Y), model=None, **kw):
    kw.setdefault("tier", "host")
    return FeatureCache.build(
        model if model is not None else prefix(),
        data,
        dtype="fp32",
        cache_dir=tmp_path,
        progress=False,
        batch_size=kw.pop("batch_size", 5),
        **kw,
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"views": 0}, "views must be ≥ 1, got 0"),
        ({"views": 2}, "pass the random transform= that makes them"),
        ({"pool": "median"}, "unknown pool 'median'"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"tier": "gpu"}, "unknown cache tier 'gpu'"),
        ({"amp": "fp16"}, "amp must be None or 'fp32'"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_settings_are_refused_before_any_work(tmp_path, bad, message):
    with pytest.raises(FastFTValueError, match=message):
        build(tmp_path, **bad)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_disk_cache_is_loaded_into_memory_for_a_host_build(tmp_path):
    on_disk = build(tmp_path, tier="disk")
    clear_registry()  # another process, as far as the cache can tell
    in_memory = build(tmp_path, tier="host")
    assert in_memory.fingerprint == on_disk.fingerprint
    assert in_memory.telemetry["hit"] is True
    assert in_memory.telemetry["reason"] == "hit: loaded from disk"
    assert in_memory.tier == "host"
    rows = torch.arange(12)
    assert torch.equal(in_memory.gather(rows)[0], on_disk.gather(rows)[0])


class Exported(nn.Module):
    """Like a torch.export module: refuses train() and eval(), computes as it was made."""

    def __init__(self):
        super().__init__()
        self.linear = prefix()
        self.dropout = nn.Dropout(0.5)

    def train(self, mode=True):
        raise NotImplementedError("this module has no train/eval modes")

    def forward(self, x):
        return self.linear(x)


def test_a_prefix_without_train_modes_is_left_as_it_is(tmp_path):
    model = Exported()
    assert model.training
    cache = build(tmp_path, model=model)
    assert model.training  # neither switched to eval nor broken
    with torch.no_grad():
        expected = model.linear(X)
    torch.testing.assert_close(cache.gather(torch.arange(12))[0], expected)


class ShortStream(IterableDataset):
    """Says 12 samples, yields 8."""

    def __len__(self):
        return 12

    def __iter__(self):
        yield from zip(X[:8], Y[:8])


def test_a_stream_that_ends_early_leaves_no_cache(tmp_path):
    with pytest.raises(CacheError, match="yielded 8 samples per view but its length is 12"):
        build(tmp_path, data=DataLoader(ShortStream(), batch_size=4))


def test_an_opaque_disk_cache_is_removed_when_its_process_ends(tmp_path):
    """A cache whose key cannot see everything is never reused, so its folder must not pile
    up in the cache directory: it is deleted at exit."""
    code = textwrap.dedent(
        """
        import sys, warnings, torch
        from torch import nn
        from fastft.cache import FeatureCache

        log = open(sys.argv[2], "w")  # an open file: the key cannot see what it holds

        def transform(x):
            log.write("seen\\n")
            return x

        warnings.simplefilter("ignore")
        cache = FeatureCache.build(
            nn.Linear(5, 4), (torch.randn(6, 5), torch.arange(6) % 2), tier="disk",
            dtype="fp32", transform=transform, cache_dir=sys.argv[1], progress=False,
        )
        print(cache.path)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "caches"), str(tmp_path / "log.txt")],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    folder = out.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path / "caches"))
    assert not os.path.exists(folder)  # built, then removed at exit
    assert (tmp_path / "log.txt").read_text().count("seen") >= 1
