"""Sharded cache building on torch.distributed (gloo, two CPU processes spawned from pytest).

Under a process group, a disk cache is built by every rank together: each rank runs the
frozen prefix on its own share of the chunks and writes them into the one cache folder.
The result is the single-process cache byte for byte, with the same fingerprint; a rank
killed mid-build loses only its uncommitted chunks, and a relaunch recomputes none of the
committed ones.

The prefix logs the first sample of every call (column 0 of the data is the sample index),
so the tests count exactly which chunks each rank computed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastft
from fastft.cache import FeatureCache, disk, disk_build, journal, registry, sharded
from fastft.errors import CacheCorruptError, CacheError, DataError

sys.path.insert(0, os.path.dirname(__file__))
from helpers.oracle import trainable_state  # noqa: E402
from helpers.spawned import exit_without_finalizing  # noqa: E402

N, BATCH = 203, 16  # 13 chunks per view, the last one short
STARTS = list(range(0, N, BATCH))
WORLD = 2


class Logged(nn.Module):
    """A small MLP prefix that appends the first sample index of every call to ``log`` (one
    line per call; the file survives a SIGKILL) and SIGKILLs its process at call ``kill_at``."""

    # The logging and killing are test instrumentation: left out of the cache key, so that
    # every rank and every run of a test builds the same cache.
    fastft_key_ignore = ("log", "kill_at", "calls", "instrument")

    def __init__(self, log: str | None = None, kill_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 64), nn.GELU(), nn.Linear(64, 48), nn.Tanh())
        self.log, self.kill_at, self.calls = log, kill_at, 0
        self.instrument = _instrument

    def forward(self, x):
        self.calls += 1
        self.instrument(self, x)
        return self.net(x)


def _instrument(prefix: Logged, x: torch.Tensor) -> None:
    if prefix.kill_at is not None and prefix.calls == prefix.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before computing this chunk
    if prefix.log is not None:
        with open(prefix.log, "a") as f:
            f.write(f"{int(x[0, 0].round())}\n")


class NaNAt20(Logged):
    """NaN features for sample 20 (in chunk 1, rank 1's share)."""

    def forward(self, x):
        return torch.where(x[:, :1] == 20, float("nan"), super().forward(x))


def data(n: int = N):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, 12, generator=g)
    X[:, 0] = torch.arange(n, dtype=torch.float32)  # the sample index, read back by Logged
    return X, torch.randint(0, 4, (n,), generator=g)


def jitter(x, generator=None):
    """A random augmentation (seeded per chunk by fastft) that keeps column 0, the index."""
    noise = torch.randn(x.shape, generator=generator) * 0.1
    noise[:, 0] = 0
    return x + noise


BUILDS = {  # name: (build arguments, whether the data is a map-style Dataset)
    "fp32": (dict(dtype="fp32"), False),
    "fp16_views": (dict(dtype="fp16", views=2, transform=jitter), True),
}


def build(
    name: str, cache_dir: str, log: str | None = None, kill_at: int | None = None
) -> FeatureCache:
    kwargs, as_dataset = BUILDS[name]
    X, y = data()
    dataset = torch.utils.data.TensorDataset(X, y) if as_dataset else (X, y)
    return FeatureCache.build(
        Logged(log, kill_at),
        dataset,
        tier="disk",
        batch_size=BATCH,
        cache_dir=cache_dir,
        progress=False,
        **kwargs,
    )


def spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in two fresh processes of one gloo group (one thread each)."""
    mp.start_processes(_in_group, args=(fn, *args), nprocs=WORLD, join=True, start_method="spawn")


def spawn_and_kill(fn, *args, victim: int) -> None:
    """Like :func:`spawn`, for a run in which rank ``victim`` SIGKILLs itself: wait for that
    rank, require it to have died of SIGKILL (not of an exception, not of old age), then end
    the other ranks wherever they are (blocked on the dead peer, or failing because of it)."""
    ctx = mp.start_processes(
        _in_group, args=(fn, *args), nprocs=WORLD, join=False, start_method="spawn"
    )
    dead, errors = ctx.processes[victim], [Path(f) for f in ctx.error_files]
    try:
        dead.join(timeout=300)
        if dead.exitcode != -signal.SIGKILL:
            trace = pickle.loads(errors[victim].read_bytes()) if errors[victim].exists() else ""
            pytest.fail(
                f"rank {victim} ended with exit code {dead.exitcode}, not by SIGKILL\n{trace}"
            )
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(timeout=60)
        for f in errors:  # the tracebacks of ranks that raised (torch's join would read them)
            f.unlink(missing_ok=True)


def _in_group(rank: int, fn, init: str, *args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


def logged_starts(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def data_files(cache: FeatureCache) -> dict[str, bytes]:
    manifest = disk.read_manifest(Path(cache.path))
    return {a.file: (Path(cache.path) / a.file).read_bytes() for a in disk.arrays(manifest)}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the one-thread ranks
    yield
    torch.set_num_threads(before)


def single(name: str, cache_dir: Path) -> FeatureCache:
    registry.clear()
    return build(name, str(cache_dir))


# ---------------------------------------------------------------------------- the journals
def test_rank_journals_are_read_with_the_journal_and_folded_into_it(tmp_path):
    record = journal.Journal(tmp_path)
    record.add(0, 0, 4, {"tap0.bin": 1})
    record.save()
    for rank, (start, count, crc) in enumerate([(0, 2, 3), (4, 4, 2)]):
        mine = journal.Journal(tmp_path, shard=rank)  # a rank reads and writes only its own file
        assert mine.chunks == {}
        mine.add(0, start, count, {"tap0.bin": crc})
        mine.save()
    assert [p.name for p in journal.shard_journals(tmp_path)] == [
        "journal.rank0.json",
        "journal.rank1.json",
    ]

    merged = journal.Journal(tmp_path)  # rank 0 rewrote samples 0..1: its newer chunk wins
    assert merged.chunks == {(0, 0): (2, {"tap0.bin": 3}), (0, 4): (4, {"tap0.bin": 2})}
    merged.save()
    assert journal.shard_journals(tmp_path) == []
    assert journal.Journal(tmp_path).chunks == merged.chunks
    with pytest.raises(CacheCorruptError, match="not a plain file name"):
        disk.safe_path(tmp_path, "journal.rank3.json")  # a manifest may not name a journal as data


# ---------------------------------------------------------------------------- sharded build
def _build_both(rank: int, cache_dir: str, logs: str) -> None:
    for name in BUILDS:
        cache = build(name, cache_dir, log=f"{logs}/{name}.rank{rank}")
        Path(f"{logs}/{name}.rank{rank}.json").write_text(
            json.dumps({"fingerprint": cache.fingerprint, "telemetry": cache.telemetry})
        )


def test_sharded_build_equals_single_process(tmp_path, one_thread):
    logs = tmp_path / "logs"
    logs.mkdir()
    spawn(_build_both, str(tmp_path / "init"), str(tmp_path / "shared"), str(logs))

    for name, (kwargs, _) in BUILDS.items():
        views = kwargs.get("views", 1)
        ref = single(name, tmp_path / "single")
        sharded = FeatureCache.from_folder(tmp_path / "shared" / ref.fingerprint)
        assert sharded.fingerprint == ref.fingerprint
        assert data_files(sharded) == data_files(ref), name  # byte for byte
        assert not journal.shard_journals(Path(sharded.path))  # merged into journal.json
        assert journal.Journal(Path(sharded.path)).chunks == journal.Journal(Path(ref.path)).chunks

        # Each rank ran the prefix on its own chunks only: the shares are disjoint, together
        # every chunk of every view, and as even as 13 chunks per view allow.
        calls = [logged_starts(logs / f"{name}.rank{r}") for r in range(WORLD)]
        assert sorted(calls[0] + calls[1]) == sorted(STARTS * views)
        assert abs(len(calls[0]) - len(calls[1])) <= 1
        assert len(calls[0]) and len(calls[1])
        reports = [json.loads((logs / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]
        assert {rep["fingerprint"] for rep in reports} == {ref.fingerprint}
        assert [rep["telemetry"]["prefix_calls"] for rep in reports] == [len(c) for c in calls]
        assert reports[0]["telemetry"]["prefix_calls_by_rank"] == [len(c) for c in calls]
        assert journal.verify_folder(Path(sharded.path))["complete"]


# ---------------------------------------------------------------------------- a rank dies
def _killed_build(rank: int, cache_dir: str, logs: str, kill_at: int) -> None:
    disk_build.COMMIT_INTERVAL_S = 0.0  # commit every chunk: what a kill loses is then exact
    build("fp32", cache_dir, log=f"{logs}/rank{rank}", kill_at=kill_at if rank == 1 else None)


def _relaunch(rank: int, cache_dir: str, logs: str) -> None:
    cache = build("fp32", cache_dir, log=f"{logs}/rank{rank}")
    Path(f"{logs}/rank{rank}.json").write_text(json.dumps(cache.telemetry))


@pytest.mark.reliability(
    "one rank of a sharded disk-cache build SIGKILLed mid-build, then a relaunch",
    "every chunk any rank committed is reused, none recomputed; bytes equal one process",
)
def test_rank_killed_mid_build_then_relaunch_recomputes_nothing_committed(tmp_path, one_thread):
    shared, first, second = tmp_path / "shared", tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    # Rank 1 commits two chunks (its 1st and 2nd calls) and dies at its 3rd; the parent then
    # ends rank 0 wherever it is.
    spawn_and_kill(_killed_build, str(tmp_path / "init1"), str(shared), str(first), 3, victim=1)
    folder = next(p for p in shared.iterdir() if not p.name.startswith("."))
    assert disk.read_manifest(folder)["status"] == "building"
    rank1 = journal.Journal(folder, shard=1)
    assert (
        sorted(start for _, start in rank1.chunks)
        == logged_starts(first / "rank1")
        == [STARTS[1], STARTS[3]]
    )
    committed = {start for _, start in journal.Journal(folder).chunks}  # every rank's journal
    assert committed >= {STARTS[1], STARTS[3]} and committed < set(STARTS)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(folder, interrupted / folder.name)  # for the one-process resume below

    spawn(_relaunch, str(tmp_path / "init2"), str(shared), str(second))
    again = [logged_starts(second / f"rank{r}") for r in range(WORLD)]
    assert not committed & set(again[0] + again[1])  # nothing committed is recomputed
    assert sorted(again[0] + again[1]) == sorted(
        set(STARTS) - committed
    )  # every missing chunk, once
    assert abs(len(again[0]) - len(again[1])) <= 1  # the rest split evenly, whoever owned it before
    reports = [json.loads((second / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert reports[0]["rows_reused"] == sum(min(BATCH, N - s) for s in committed)

    ref = single("fp32", tmp_path / "single")
    resumed = FeatureCache.from_folder(folder)
    assert resumed.fingerprint == ref.fingerprint
    assert data_files(resumed) == data_files(ref)
    assert journal.verify_folder(folder)["complete"]

    # The same interrupted folder resumed by one process (no torchrun) gives the same bytes.
    registry.clear()
    alone = build("fp32", str(interrupted), log=str(tmp_path / "alone"))
    assert sorted(logged_starts(tmp_path / "alone")) == sorted(set(STARTS) - committed)
    assert data_files(alone) == data_files(ref)
    assert not journal.shard_journals(Path(alone.path))


# ---------------------------------------------------------------------------- FineTuner.fit
def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def fit_data():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(150, 10, generator=g)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


FIT = dict(epochs=3, batch_size=16, lr=0.01, optimizer="adamw")


def finetuner(cache_dir: str) -> fastft.FineTuner:
    return fastft.FineTuner(
        make_model(),
        num_classes=4,
        hidden=[8],
        cache="disk",
        cache_dtype="fp32",
        cache_dir=cache_dir,
        extract_batch_size=32,
        verbose=False,
    )


def _fit_and_misuse(rank: int, cache_dir: str, out: str) -> None:
    ft = finetuner(cache_dir)
    ft.fit(fit_data(), **FIT)
    result = {
        "state": trainable_state(ft.model),
        "loss": ft.history[-1]["loss"],
        "telemetry": ft.cache.telemetry,
    }

    # Ranks that pass different data: a clear error on every rank, not a hang or a mixed cache.
    X, y = fit_data()
    try:
        FeatureCache.build(
            nn.Linear(10, 4),
            (X[rank::2], y[rank::2]),
            tier="disk",
            cache_dir=cache_dir,
            progress=False,
        )
    except DataError as exc:
        result["different_data"] = str(exc)
    # A cache dir that is not shared (one folder per rank): every rank says so.
    try:
        FeatureCache.build(
            nn.Linear(10, 4),
            (X, y),
            tier="disk",
            cache_dir=f"{cache_dir}-rank{rank}",
            progress=False,
        )
    except CacheError as exc:
        result["not_shared"] = str(exc)

    # NaN features on rank 1: rank 1 raises the DataError naming the sample, rank 0 a
    # CacheError naming rank 1 and that error.
    try:
        FeatureCache.build(
            NaNAt20(), data(), tier="disk", batch_size=BATCH, cache_dir=cache_dir, progress=False
        )
    except (DataError, CacheError) as exc:
        result["nan"] = (type(exc).__name__, str(exc))

    # Rows of rank 1 clobbered after it committed them (as a network filesystem that writes
    # back whole pages could do): the checksum pass before completion finds them and rank 0
    # recomputes that chunk.
    finish, sharded.VERIFY_SHARDS = sharded._finish_shards, True

    def clobber_then_finish(job, *rest):
        with open(job.folder / "tap0.bin", "r+b") as f:
            f.seek(BATCH * 48 * 4)  # the first row of chunk 1, rank 1's
            f.write(bytes(8))
        return finish(job, *rest)

    sharded._finish_shards = clobber_then_finish
    try:
        build("fp32", f"{cache_dir}-clobbered", log=f"{out}.clobbered.rank{rank}")
    finally:
        sharded._finish_shards, sharded.VERIFY_SHARDS = finish, None
    torch.save(result, f"{out}.rank{rank}")


def test_fit_with_a_disk_cache_builds_it_sharded_and_trains_like_one_process(tmp_path, one_thread):
    out = str(tmp_path / "out")
    spawn(_fit_and_misuse, str(tmp_path / "init"), str(tmp_path / "shared"), out)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(WORLD)]

    registry.clear()
    one = finetuner(str(tmp_path / "single"))
    one.fit(fit_data(), **FIT)
    want = trainable_state(one.model)
    for got in ranks:
        assert set(got["state"]) == set(want)
        for name, w in want.items():
            torch.testing.assert_close(got["state"][name], w, rtol=0, atol=1e-5, msg=name)
        assert got["loss"] == pytest.approx(one.history[-1]["loss"], abs=1e-5)
    # The train cache was built once, split between the ranks: 150 rows / 32 = 5 chunks.
    calls = [got["telemetry"]["prefix_calls"] for got in ranks]
    assert sorted(calls) == [2, 3] and one.cache.telemetry["prefix_calls"] == 5
    shared = tmp_path / "shared" / one.cache.fingerprint
    assert data_files(FeatureCache.from_folder(shared)) == data_files(one.cache)

    for got in ranks:
        assert "every rank must build a disk cache of the same model, data" in got["different_data"]
    assert "does not see the cache folder" in ranks[1]["not_shared"]
    assert "FASTFT_CACHE_DIR" in ranks[1]["not_shared"]
    assert "rank 1 failed" in ranks[0]["not_shared"]

    assert ranks[1]["nan"][0] == "DataError" and "sample 20 " in ranks[1]["nan"][1]
    assert ranks[0]["nan"][0] == "CacheError"
    assert "rank 1 failed" in ranks[0]["nan"][1] and "sample 20 " in ranks[0]["nan"][1]
    assert "running the job again resumes" in ranks[0]["nan"][1]

    clobbered = [logged_starts(Path(f"{out}.clobbered.rank{r}")) for r in range(WORLD)]
    assert STARTS[1] in clobbered[1] and clobbered[0].count(STARTS[1]) == 1  # recomputed by rank 0
    assert sorted(set(clobbered[0] + clobbered[1])) == STARTS
    ref = single("fp32", tmp_path / "single")
    repaired = FeatureCache.from_folder(tmp_path / "shared-clobbered" / ref.fingerprint)
    assert data_files(repaired) == data_files(ref)
