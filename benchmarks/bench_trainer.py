"""Head training on the cache vs a DataLoader over the same features; sweeps vs one head.

Run: ``.venv/bin/python -m pytest benchmarks/bench_trainer.py --benchmark-only``.
Goals (issue 6): ≥ 3× samples/s over DataLoader(TensorDataset) for an MLP head
2048→512→100 at batch 256 on CPU; a sweep of M=8 heads ≤ 2× the time of one head.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastft import FineTuner

N, D, C, BATCH = 8192, 2048, 100, 256


@pytest.fixture(scope="module")
def features():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def backbone():
    # The frozen part is an identity map (a Linear with identity weights): the "features"
    # stand for what a frozen network produced.
    torch.manual_seed(0)
    frozen = nn.Linear(D, D)
    with torch.no_grad():
        frozen.weight.copy_(torch.eye(D))
        frozen.bias.zero_()
    return nn.Sequential(frozen, nn.Linear(D, 1000))


@pytest.fixture(scope="module")
def tuner(features, tmp_path_factory):
    X, y = features
    ft = FineTuner(
        backbone(),
        num_classes=C,
        hidden=[512],
        cache="host",
        cache_dtype="fp32",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        verbose=False,
    )
    ft.fit((X, y), epochs=1, batch_size=BATCH)  # builds the cache once
    return ft


def test_head_epoch_fastft_cache(benchmark, recorder, tuner, features):
    X, y = features
    recorder.run(
        benchmark,
        "MLP head 2048-512-100, 1 epoch of 8192 rows",
        "fastft",
        lambda: tuner.fit((X, y), epochs=1, batch_size=BATCH),
        baseline="dataloader",
        rounds=5,
        warmup=1,
    )


def test_head_epoch_dataloader(benchmark, recorder, tuner, features):
    X, y = features
    head = copy.deepcopy(tuner.model[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()

    def epoch():
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(head(xb), yb).backward()
            opt.step()

    recorder.run(
        benchmark,
        "MLP head 2048-512-100, 1 epoch of 8192 rows",
        "dataloader",
        epoch,
        baseline="dataloader",
        rounds=5,
        warmup=1,
    )


SWEEP = [{"lr": lr, "weight_decay": wd} for lr in (1e-3, 3e-4, 1e-4, 3e-5) for wd in (0.0, 0.01)]


def test_sweep_8_heads(benchmark, recorder, tuner, features):
    X, y = features
    recorder.run(
        benchmark,
        "sweep 1 epoch (head-only time)",
        "8 heads",
        lambda: tuner.fit_many(SWEEP, (X, y), epochs=1, batch_size=BATCH, keep_best=False),
        baseline="1 head",
        rounds=3,
        warmup=1,
    )


def test_sweep_1_head(benchmark, recorder, tuner, features):
    X, y = features
    recorder.run(
        benchmark,
        "sweep 1 epoch (head-only time)",
        "1 head",
        lambda: tuner.fit_many(SWEEP[:1], (X, y), epochs=1, batch_size=BATCH, keep_best=False),
        baseline="1 head",
        rounds=3,
        warmup=1,
    )


# The data path alone: what fastft replaces. One epoch of batches fetched, no head compute.
def test_fetch_epoch_cache_gather(benchmark, recorder, tuner, features):
    cache = tuner.cache
    g = torch.Generator().manual_seed(0)

    def epoch():
        perm = torch.randperm(N, generator=g)
        for s in range(0, N, BATCH):
            cache.gather_shaped(perm[s : s + BATCH])

    recorder.run(
        benchmark,
        "batch fetch only, 1 epoch of 8192 rows x 2048",
        "fastft",
        epoch,
        baseline="dataloader",
        rounds=10,
    )


def test_fetch_epoch_dataloader(benchmark, recorder, features):
    X, y = features
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True)

    def epoch():
        for _ in loader:
            pass

    recorder.run(
        benchmark,
        "batch fetch only, 1 epoch of 8192 rows x 2048",
        "dataloader",
        epoch,
        baseline="dataloader",
        rounds=10,
    )


# A sweep as users run it: the frozen backbone's pass plus the heads, from a cold cache.
def _conv_backbone():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 1000),
    )


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4096, 3, 32, 32, generator=g), torch.randint(0, 10, (4096,), generator=g)


@pytest.mark.parametrize("heads", [1, 8])
def test_sweep_end_to_end_cold_cache(benchmark, recorder, images, heads, tmp_path_factory):
    from fastft.cache import registry

    X, y = images

    def run():
        registry.clear()  # cold: the frozen pass is paid in every round
        ft = FineTuner(
            _conv_backbone(),
            num_classes=10,
            hidden=[256],
            cache="host",
            cache_dir=str(tmp_path_factory.mktemp("c")),
            verbose=False,
        )
        ft.fit_many(SWEEP[:heads], (X, y), epochs=3, batch_size=BATCH, keep_best=False)

    recorder.run(
        benchmark,
        "sweep end-to-end (frozen pass + 3 epochs), conv backbone",
        f"{heads} heads",
        run,
        baseline="1 heads",
        rounds=3,
        warmup=0,
    )
