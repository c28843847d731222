"""Checkpoints are atomic and weights-only: a crash mid-save never loses the previous one,
and nothing executable is ever loaded from a checkpoint file."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastft.train.checkpoint import CheckpointError, load_checked, save_atomic

SAVER = textwrap.dedent(
    """
    import sys, torch
    from fastft.train.checkpoint import save_atomic
    path = sys.argv[1]
    i = 1
    while True:   # keep replacing the checkpoint with bigger and bigger states until killed
        save_atomic({"step": i, "state": {"w": torch.full((200_000 + i,), float(i))}}, path)
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.reliability(
    "SIGKILL during save() of a checkpoint", "the previous checkpoint stays loadable"
)
def test_sigkill_during_save_keeps_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 0, "state": {"w": torch.zeros(3)}}, path)
    for delay in (0.05, 0.2, 0.45, 0.8):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.6 + delay)  # start-up, then a few saves, killed at a different point each time
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        obj = load_checked(path)
        step = obj["step"]
        w = obj["state"]["w"]
        assert step == 0 or (w.numel() == 200_000 + step and bool((w == step).all()))
    # Torn temporaries may remain from the killed writer, but never under the real name.
    assert all(p.name.startswith(".ckpt.pt.") for p in tmp_path.iterdir() if p.name != "ckpt.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.reliability(
    "a checkpoint file carrying pickled code", "refused by weights-only loading, nothing runs"
)
def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "fastft-finetuner", "version": 1, "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checked(path)


@pytest.mark.reliability("a truncated checkpoint file", "a clear CheckpointError")
def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"state": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable fastft checkpoint"):
        load_checked(path)


@pytest.mark.parametrize(
    "obj,words",
    [
        ({"format": "other"}, "not a fastft FineTuner checkpoint"),
        ({"format": "fastft-finetuner", "version": 99}, "version 99"),
    ],
)
def test_foreign_or_future_checkpoint(tmp_path, obj, words):
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=words):
        load_checked(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checked(tmp_path / "nope.pt")
