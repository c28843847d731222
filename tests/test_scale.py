"""Scale without running out of memory: a 2,000,000 x 384 int8 disk cache (0.79 GB) is built
and trained for one epoch in a process whose peak resident memory stays under 1.5 GB.

The frozen prefix is synthetic (Linear(8, 384) + Tanh over 8 random inputs per sample), so
the inputs are 64 MB while the cache is 0.79 GB: the features never exist in memory as
one tensor, they go batch by batch into the memory-mapped files and come back batch by
batch in training. It runs in a subprocess so that ``ru_maxrss`` is this workload's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS, DIM = 2_000_000, 384
RSS_LIMIT_MB = 1500

SCRIPT = textwrap.dedent(f"""
    import json, os, resource, sys, time
    import torch
    from torch import nn
    import fastft
    from fastft import FeatureCache

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    N, D = {ROWS}, {DIM}
    cache_dir, out = sys.argv[1], {{}}
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(N, 8, generator=g), torch.randint(0, 10, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, D), nn.Tanh(), nn.Linear(D, 10))
    out["rss_before_mb"] = peak_mb()
    t0 = time.perf_counter()
    if hasattr(fastft, "FineTuner") and not os.environ.get("FASTFT_SCALE_GATHER"):
        out["trainer"] = "FineTuner"
        ft = fastft.FineTuner(model, num_classes=10, cache="disk", cache_dtype="int8",
                              cache_dir=cache_dir, extract_batch_size=8192, verbose=False)
        cache = ft.build_cache((X, y), dataset_id="scale-synthetic")
        out["build_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        history = ft.fit((X, y), epochs=1, batch_size=4096, dataset_id="scale-synthetic")
        out["loss"] = history[-1]["loss"]
    else:  # the trainer has not landed: gather every row in shuffled batches as it would
        out["trainer"] = "gather"
        cache = FeatureCache.build(model[:2], (X, y), dtype="int8", tier="disk",
                                   batch_size=8192, cache_dir=cache_dir,
                                   dataset_id="scale-synthetic", progress=False)
        out["build_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        for rows in torch.randperm(N, generator=g).split(4096):
            (feats,) = cache.gather(rows)
            assert feats.shape == (rows.numel(), D)
    out["train_s"] = time.perf_counter() - t1
    out["rss_peak_mb"] = peak_mb()
    # The stored rows are the prefix's output within one int8 step (per-row scale = max|x| / 127).
    rows = torch.tensor([0, 1, N // 2, N - 1])
    (got,) = cache.gather(rows)
    with torch.no_grad():
        want = model[1](model[0](X[rows]))
    step = want.abs().amax(1, keepdim=True) / 127
    out["max_error_in_steps"] = float(((got - want).abs() / step).max())
    out["tier"], out["cache_bytes"], out["num_rows"] = cache.tier, cache.nbytes, cache.num_rows
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.reliability(
    "a 2,000,000 x 384 int8 disk cache (0.79 GB) built and trained one epoch",
    "peak resident memory of the process < 1.5 GB; rows correct to one int8 step",
)
def test_two_million_row_cache_trains_within_memory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nscale: {result}")
    assert result["tier"] == "disk" and result["num_rows"] == ROWS
    assert (
        result["cache_bytes"] == ROWS * (DIM + 4) + ROWS * 8
    )  # int8 rows, fp32 scales, int64 labels
    assert result["max_error_in_steps"] <= 1.0
    assert result["rss_peak_mb"] < RSS_LIMIT_MB, result
