"""Checkpoints are atomic and weights-only: a crash mid-save never loses the previous one,
and nothing executable is ever loaded from a checkpoint file."""

from __future__ import annotations

import os
import pickle
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from fastft.train.checkpoint import CheckpointError, load_checked, save_atomic

SIZE, CHUNK, PAUSE = 400_000, 1 << 15, 0.04  # ~1.6 MB in 50 pieces: a write of about 2 s

SAVER = textwrap.dedent(
    f"""
    import os, sys, time, torch
    from fastft.train.checkpoint import save_atomic

    path = sys.argv[1]

    def state(i):  # each step's checkpoint has its own size and values
        return {{"step": i, "state": {{"w": torch.full(({SIZE} + i,), float(i))}}}}

    def say(word, i):
        print(word, i, flush=True)

    save_atomic(state(1), path)  # a complete checkpoint before the parent may kill
    say("saved", 1)

    # Instrument the next saves (save_atomic itself unchanged): torch.save says "writing"
    # and writes its bytes slowly, os.replace says "replacing" and waits before the rename,
    # so that the parent's SIGKILL lands inside the write, or after it but before the rename.
    real_save, real_replace = torch.save, os.replace

    class Slow:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            data = memoryview(data)
            for at in range(0, len(data), {CHUNK}):
                time.sleep({PAUSE})
                self.f.write(data[at : at + {CHUNK}])
            return len(data)

        def flush(self):
            self.f.flush()

    def slow_save(obj, f, *args, **kwargs):
        say("writing", obj["step"])
        real_save(obj, Slow(f), *args, **kwargs)

    def slow_replace(src, dst):
        say("replacing", os.path.basename(src))
        time.sleep(60)
        real_replace(src, dst)

    torch.save, os.replace = slow_save, slow_replace
    i = 2
    while True:
        save_atomic(state(i), path)
        say("saved", i)
        i += 1
    """
)


def kill_inside_a_save(path, phase: str, delay: float, stderr) -> tuple[int, str]:
    """Start SAVER, wait until it says ``phase`` ("writing" or "replacing"), SIGKILL it
    ``delay`` s later; returns the last step it saved completely and what it said with
    ``phase``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the saver ended before the kill

    threading.Thread(target=read, daemon=True).start()
    saved = 0
    try:
        while True:
            line = lines.get(timeout=120)
            if line is None:
                proc.wait(timeout=30)
                stderr.flush()
                pytest.fail(f"the saver ended by itself ({proc.returncode}): see {stderr.name}")
            word, arg = line.split()
            if word == "saved":
                saved = int(arg)
            elif word == phase:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return saved, arg


@pytest.mark.reliability(
    "SIGKILL during save() of a checkpoint", "the previous checkpoint stays loadable"
)
def test_sigkill_during_save_keeps_a_loadable_checkpoint(tmp_path):
    # Killed inside the write (at three points) and between the write and the rename.
    path = tmp_path / "ckpt.pt"
    stderr = open(tmp_path / "saver.err", "w")  # noqa: SIM115 (closed below)
    try:
        for phase, delay in [
            ("writing", 0.0),
            ("writing", 0.3),
            ("writing", 0.8),
            ("replacing", 0.1),
        ]:
            saved, said = kill_inside_a_save(path, phase, delay, stderr)
            assert saved >= 1  # a save completed before the kill
            # The kill landed inside the next save: the real name still holds the previous
            # checkpoint, whole, never the one being written nor a torn file.
            obj = load_checked(path)
            w = obj["state"]["w"]
            assert obj["step"] == saved, (phase, delay)
            assert w.numel() == SIZE + saved and bool((w == saved).all())
            # What the killed save left is a temporary file beside it, never the real name.
            (torn,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.")]
            if phase == "writing":
                assert int(said) == saved + 1
                assert torn.stat().st_size < path.stat().st_size  # killed mid-write
            else:  # written and fsynced, only the rename was missing
                assert torn.name == said
                assert load_checked(torn)["step"] == saved + 1
            torn.unlink()
    finally:
        stderr.close()


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
