"""Data-parallel head training on torch.distributed (gloo, two CPU processes).

Each rank takes its slice of the same global randperm batch; the gradient all-reduce makes
the final weights equal single-process training with the same global batch.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastft

sys.path.insert(0, os.path.dirname(__file__))
from helpers.oracle import trainable_state  # noqa: E402
from helpers.spawned import exit_without_finalizing  # noqa: E402


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))


def data():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(70, 10, generator=g)  # 70 rows, batch 16: the last global batch is uneven
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


FIT = dict(epochs=3, batch_size=16, lr=0.01, optimizer="adamw", weight_decay=0.01)


def _worker(rank: int, world: int, init_file: str, out: str, cache_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ft = fastft.FineTuner(
            make_model(),
            num_classes=4,
            hidden=[8],
            cache_dtype="fp32",
            cache="host",
            cache_dir=cache_dir,
            verbose=False,
        )
        ft.fit(data(), **FIT)
        if rank == 0:
            torch.save({"state": trainable_state(ft.model), "loss": ft.history[-1]["loss"]}, out)
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


def test_ddp_head_training_equals_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "init"), out, str(tmp_path / "c")),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ddp = torch.load(out)

    single = fastft.FineTuner(
        make_model(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        cache="host",
        cache_dir=str(tmp_path / "c1"),
        verbose=False,
    )
    single.fit(data(), **FIT)
    want = trainable_state(single.model)
    assert set(ddp["state"]) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(ddp["state"][name], w, rtol=0, atol=1e-5, msg=name)
    assert ddp["loss"] == pytest.approx(single.history[-1]["loss"], abs=1e-5)
