"""Disk caches: interrupted builds resume, damaged files are detected, two builders share one.

Processes that die or race are real subprocesses running the script below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastft.cache as fcache
from fastft.cache import FeatureCache, folders, registry
from fastft.errors import CacheCorruptError, CacheError, CacheLockedError

from helpers.caches import build_on_disk

ROOT = Path(__file__).resolve().parent.parent

# The same prefix and data in this process and in the workers (seeded), hence the same key.
SETUP = textwrap.dedent("""
    import torch
    from torch import nn

    class Counting(nn.Module):
        fastft_key_ignore = ("calls", "fail_at", "on_call")  # test instrumentation, not computation

        def __init__(self, inner, fail_at=None, on_call=None):
            super().__init__()
            self.inner, self.calls, self.fail_at, self.on_call = inner, 0, fail_at, on_call

        def forward(self, x):
            self.calls += 1
            if self.on_call is not None:
                self.on_call(self.calls)
            if self.fail_at is not None and self.calls == self.fail_at:
                raise KeyboardInterrupt("injected")
            return self.inner(x)

    def make(fail_at=None, on_call=None):
        torch.manual_seed(0)
        prefix = Counting(nn.Sequential(nn.Linear(6, 24), nn.Tanh()), fail_at, on_call)
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(100, 6, generator=g), torch.randint(0, 3, (100,), generator=g)
        return prefix, (X, y)
""")
namespace: dict = {}
exec(SETUP, namespace)
make = namespace["make"]

WORKER = SETUP + textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from fastft.cache import FeatureCache, disk_build, folders, registry

    mode, cache_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "kill":  # commit every chunk, die by SIGKILL in the 6th prefix call
        disk_build.COMMIT_INTERVAL_S = 0.0
        prefix, data = make(on_call=lambda k: k == 6 and os.kill(os.getpid(), signal.SIGKILL))
    else:  # race: slow prefix; start when the test says so
        prefix, data = make(on_call=lambda k: time.sleep(0.05))
        (out.parent / (out.name + ".ready")).touch()
        while not (out.parent / "go").exists():
            time.sleep(0.01)
    cache = FeatureCache.build(prefix, data, tier="disk", dtype="fp32", batch_size=10,
                               cache_dir=cache_dir, progress=False)
    out.write_text(json.dumps({"calls": prefix.calls, "hit": cache.telemetry["hit"],
                               "reason": cache.telemetry["reason"]}))
""")


pytestmark = pytest.mark.usefixtures("fresh_registry")


def expected(data):
    """The prefix's output in batches of 10, as the build runs it (BLAS results depend on
    the batch shape in the last bit)."""
    prefix, _ = make()
    with torch.no_grad():
        return torch.cat([prefix.inner(x) for x in data[0].split(10)])


def run_worker(mode, cache_dir, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(cache_dir), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


# ---------------------------------------------------------------------------- resume
@pytest.mark.reliability(
    "exception (Ctrl-C) in the 4th batch of a disk build",
    "next build resumes: the 3 committed batches are not recomputed",
)
def test_interrupted_build_resumes_without_recomputing(tmp_path):
    prefix, data = make(fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        build_on_disk(prefix, data, tmp_path)
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache.open(next(p for p in tmp_path.iterdir() if not p.name.startswith(".")))
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    assert prefix.calls == 10 - 3  # chunks 0..2 were committed before the interruption
    assert cache.telemetry["reason"] == "resumed: 30 of 100 rows were already committed"
    torch.testing.assert_close(cache.gather(torch.arange(100))[0], expected(data), rtol=0, atol=0)
    assert torch.equal(cache.labels, data[1])
    assert cache.verify()["complete"]


@pytest.mark.reliability(
    "builder process killed (SIGKILL) in its 6th batch",
    "next build resumes from the journal; result equals an uninterrupted build",
)
def test_killed_build_resumes_from_the_journal(tmp_path):
    proc = run_worker("kill", tmp_path, tmp_path / "out.json")
    proc.wait(timeout=120)
    assert proc.returncode == -9, proc.stdout.read().decode()
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    assert prefix.calls == 10 - 5
    torch.testing.assert_close(cache.gather(torch.arange(100))[0], expected(data), rtol=0, atol=0)


@pytest.mark.reliability(
    "two processes build the same disk cache at once",
    "one computes, the other waits on the lock and reuses it",
)
def test_two_processes_build_one_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [run_worker("race", cache_dir, out) for out in outs]
    deadline = time.monotonic() + 120
    while not all((o.parent / (o.name + ".ready")).exists() for o in outs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.stdout.read().decode() for p in procs if p.poll() is not None
        ]
        time.sleep(0.02)
    (tmp_path / "go").touch()
    for p in procs:
        p.wait(timeout=120)
        assert p.returncode == 0, p.stdout.read().decode()
    results = sorted((json.loads(o.read_text()) for o in outs), key=lambda r: r["calls"])
    assert results[0] == {"calls": 0, "hit": True, "reason": "hit: built by another process"}
    assert results[1]["calls"] == 10 and results[1]["hit"] is False
    cache = FeatureCache.open(fcache.list_caches(cache_dir)[0]["fingerprint"], cache_dir=cache_dir)
    assert cache.verify()["ok"]


# ---------------------------------------------------------------------------- damage
@pytest.mark.reliability(
    "a cache file truncated on disk", "CacheCorruptError on open; build rebuilds it"
)
def test_truncated_file_is_detected_and_rebuilt(tmp_path):
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    path, fp = cache.path, cache.fingerprint
    del cache
    with open(path / "tap0.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CacheCorruptError, match="tap0.bin has 1000 bytes"):
        FeatureCache.open(fp, cache_dir=tmp_path)
    registry.clear()
    rebuilt = build_on_disk(prefix, data, tmp_path)
    assert prefix.calls == 20 and rebuilt.telemetry["reason"].startswith(
        "rebuilt: the cache on disk was corrupt"
    )
    torch.testing.assert_close(rebuilt.gather(torch.arange(100))[0], expected(data), rtol=0, atol=0)


@pytest.mark.reliability(
    "one bit flipped in a cache file", "verify() raises CacheCorruptError naming file and samples"
)
def test_bit_flip_is_caught_by_verify(tmp_path):
    prefix, data = make()
    fp = build_on_disk(prefix, data, tmp_path).fingerprint
    assert fcache.verify(fp, cache_dir=tmp_path)["ok"]
    path = tmp_path / fp / "tap0.bin"
    raw = bytearray(path.read_bytes())
    raw[55 * 24 * 4 + 9] ^= 0x10  # sample 55
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match=r"tap0.bin \(view 0, samples 50..59\)"):
        fcache.verify(fp, cache_dir=tmp_path)
    with pytest.raises(CacheCorruptError):
        FeatureCache.open(fp, cache_dir=tmp_path).verify()


@pytest.mark.reliability(
    "corrupted chunk of an interrupted build", "dropped from the journal and recomputed on resume"
)
def test_resume_recomputes_chunks_whose_bytes_changed(tmp_path):
    prefix, data = make(fail_at=6)
    with pytest.raises(KeyboardInterrupt):
        build_on_disk(prefix, data, tmp_path)
    folder = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    with open(folder / "tap0.bin", "r+b") as f:
        f.seek(12 * 24 * 4)  # sample 12: chunk 1
        f.write(b"\xff" * 8)
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    assert prefix.calls == 10 - 4
    torch.testing.assert_close(cache.gather(torch.arange(100))[0], expected(data), rtol=0, atol=0)


# ---------------------------------------------------------------------------- management
def test_list_info_open_and_remove(tmp_path):
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    fp = cache.fingerprint
    listed = fcache.list_caches(tmp_path)
    assert [d["fingerprint"] for d in listed] == [fp]
    info = fcache.info(fp[:8], cache_dir=tmp_path)  # a unique prefix is enough
    assert (
        info["status"] == "complete" and info["num_rows"] == 100 and info["path"] == str(cache.path)
    )
    reopened = FeatureCache.open(cache.path)
    assert reopened.tier == "disk" and reopened.telemetry["reason"] == "opened"
    assert torch.equal(reopened.gather(torch.arange(10))[0], cache.gather(torch.arange(10))[0])
    fcache.remove(fp, cache_dir=tmp_path)
    assert fcache.list_caches(tmp_path) == []
    with pytest.raises(CacheError, match="no fastft cache"):
        FeatureCache.open(fp, cache_dir=tmp_path)


def test_remove_refuses_while_a_build_holds_the_lock(tmp_path):
    prefix, data = make()
    fp = build_on_disk(prefix, data, tmp_path).fingerprint
    # flock is per open file description: a second descriptor in this process contends too
    with folders.build_lock(tmp_path, fp):
        with pytest.raises(CacheLockedError):
            fcache.remove(fp, cache_dir=tmp_path)
    fcache.remove(fp, cache_dir=tmp_path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path / "x"))
    assert fcache.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FASTFT_CACHE_DIR")
    assert fcache.default_cache_dir() == Path.home() / ".cache" / "fastft"
