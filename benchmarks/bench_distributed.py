"""Sharded cache building: one process vs two (torch.distributed, gloo, CPU).

Run: ``.venv/bin/python -m pytest benchmarks/bench_distributed.py --benchmark-only``.

The same cold build of a disk fp16 cache (a small CNN over 2048 images of 3x32x32,
mean-pooled to 128 features; everything a cold build does: hashing the data and weights
for the key, the frozen forward, ``cache_write`` into the memory-mapped files, checksums,
fsyncs, journals) by one process and by two ranks of a gloo process group that shard it.
Each process computes with one thread, so two processes use this machine's two cores and
one process uses one: the ratio (time of one process / time of two) is the speed-up of
sharding the extraction, ideally 2. Both run in persistent worker processes (started once,
not timed), each round into a fresh cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

N, BATCH = 2048, 128
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_case():
    torch.manual_seed(0)
    prefix = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
    ).eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 3, 32, 32, generator=g)
    return prefix, (X, torch.randint(0, 10, (N,), generator=g))


def _worker(rank: int, world: int, init: str, jobs, done) -> None:
    """Build the cache into every folder that arrives on ``jobs`` (None ends), then report."""
    from fastft.cache import FeatureCache, registry

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    prefix, data = make_case()
    try:
        while (folder := jobs[rank].get()) is not None:
            registry.clear()  # a cold build each time (a new folder, same key)
            cache = FeatureCache.build(
                prefix,
                data,
                tier="disk",
                dtype="fp16",
                pool="mean",
                batch_size=BATCH,
                cache_dir=folder,
                progress=False,
            )
            done.put((rank, cache.telemetry["prefix_calls"], cache.num_rows))
    finally:
        if world > 1:
            dist.destroy_process_group()


class Pool:
    """``world`` persistent builder processes (one process group when world > 1)."""

    def __init__(self, world: int, tmp: Path):
        ctx = mp.get_context("spawn")
        self.world, self.tmp, self.rounds = world, tmp, 0
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.done = ctx.Queue()
        # One thread per process, for every thread pool (torch.set_num_threads alone leaves
        # some kernels on all cores): OpenMP and MKL read these when the worker starts.
        saved = {k: os.environ.get(k) for k in ONE_THREAD}
        os.environ.update(ONE_THREAD)
        try:
            self.ctx = mp.start_processes(
                _worker,
                args=(world, str(tmp / f"init{world}"), self.jobs, self.done),
                nprocs=world,
                join=False,
                start_method="spawn",
            )
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        self.prefix_calls: list[int] = []

    def build(self) -> None:
        self.rounds += 1
        folder = self.tmp / f"w{self.world}-{self.rounds}"
        for q in self.jobs:
            q.put(str(folder))
        reports = sorted(self.done.get(timeout=600) for _ in range(self.world))
        assert all(rows == N for _, _, rows in reports)
        self.prefix_calls = [calls for _, calls, _ in reports]
        shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        self.ctx.join(timeout=60)


@pytest.fixture(scope="module")
def pools():
    tmp = Path(tempfile.mkdtemp(prefix="fastft-bench-dist-"))
    made = {w: Pool(w, tmp) for w in (1, 2)}
    yield made
    for pool in made.values():
        pool.close()
    shutil.rmtree(tmp, ignore_errors=True)


CASE = f"disk fp16 build, cnn[{N},3,32,32]->128 mean, 1 thread/process"
CHUNKS = -(-N // BATCH)


@pytest.mark.parametrize("world", [1, 2], ids=["1proc", "2procs"])
def test_sharded_build(benchmark, recorder, pools, world):
    pool = pools[world]
    pool.build()  # the pool's first build (imports, first allocations) is not timed
    impl = "1 process" if world == 1 else "2 processes"
    recorder.run(benchmark, CASE, impl, pool.build, baseline="1 process", rounds=5, warmup=1)
    if world == 1:
        assert pool.prefix_calls == [CHUNKS]
    else:
        assert sorted(pool.prefix_calls) == [
            CHUNKS // 2,
            CHUNKS - CHUNKS // 2,
        ]  # the work was split


def test_paired_ratio(benchmark, pools, results_dir):
    """The same ratio from alternating pairs (1 process, then 2), median of the pair ratios,
    written to ``distributed_paired.json`` in the results folder: less exposed than the two
    tests above to the load of this shared machine drifting between them."""
    ratios, times = [], {1: [], 2: []}

    def pair() -> None:
        for world in (1, 2):
            t0 = time.perf_counter()
            pools[world].build()
            times[world].append(time.perf_counter() - t0)
        ratios.append(times[1][-1] / times[2][-1])

    benchmark.group = "distributed:pairs (1 process then 2 processes)"
    benchmark.pedantic(pair, rounds=5, warmup_rounds=0, iterations=1)
    (results_dir / "distributed_paired.json").write_text(
        json.dumps(
            {
                "case": CASE,
                "pairs": len(ratios),
                "ratio_1proc_over_2procs_median": round(statistics.median(ratios), 3),
                "ratios": [round(r, 3) for r in ratios],
                "median_s": {
                    "1 process": round(statistics.median(times[1]), 4),
                    "2 processes": round(statistics.median(times[2]), 4),
                },
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
            indent=2,
        )
    )
