"""The one frozen pass, by extraction mode: time and the accuracy of what it caches.

Run: ``.venv/bin/python -m pytest benchmarks/bench_extract.py --benchmark-only -s`` or
``fastft bench --suite extract`` (about 10 minutes on 2 CPU cores: all of BBC News at 256
tokens, four passes over 2225 articles; one round, ratios from that one run). Options through
the environment: ``FASTFT_BENCH_BBC_LIMIT`` (articles per class), ``FASTFT_BENCH_SEQ``.

For each task, measured in one run:

- **eager fp32, dataset order**: the plain loop a user writes (``model(batch)`` over the
  training and test data in dataset order, fp32) — the baseline;
- **eager bf16, dataset order**: the same loop under bf16 autocast;
- **fastft fp32**: ``FineTuner(extract_amp=None)`` building the train and test caches
  (length-aware batching where the inputs are padded token sequences);
- **fastft auto**: ``FineTuner(extract_amp="auto")``: bf16 where the CPU or GPU computes it
  natively, fp32 elsewhere.

Each fastft mode then trains the same new head on its caches for 10 epochs and reports its
test accuracy; a mode that loses more than 0.3 points against fastft fp32 is not a default
(issue 21's guard). Results: ``extract.json`` and ``extract.md`` in the results folder.
"""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch

import fastft
from fastft.bench.tasks import BenchSettings, bbc_task, cnn_task, index_rows, machine
from fastft.cache.amp import native_bf16

EPOCHS = 10
MODES = ("eager fp32", "eager bf16", "fastft fp32", "fastft auto")
RESULTS: dict[str, dict] = {}


def _eager_pass(task, bf16: bool, batch_size: int) -> float:
    """Seconds of the plain loop: the frozen part over train then test, in dataset order."""
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for X, y in (task.train, task.test):
            for start in range(0, len(y), batch_size):
                task.frozen(index_rows(X, torch.arange(start, min(start + batch_size, len(y)))))
    return time.perf_counter() - t0


def _fastft_run(task, amp, batch_size: int, tmp_path) -> dict:
    """The two frozen passes (train, test) of a FineTuner, then 10 head epochs on the caches."""
    ft = fastft.FineTuner(
        copy.deepcopy(task.model),
        head=copy.deepcopy(task.head),
        cache="host",
        cache_dtype="fp16",
        cache_dir=str(tmp_path),
        extract_batch_size=batch_size,
        extract_amp=amp,
        seed=0,
        verbose=False,
    )
    t0 = time.perf_counter()
    train_cache = ft.build_cache(task.train)
    ft.build_cache(task.test, evaluation=True)
    seconds = time.perf_counter() - t0
    history = ft.fit(task.train, val=task.test, epochs=EPOCHS, batch_size=32, lr=1e-3)
    return {
        "seconds": seconds,
        "test_accuracy": history[-1]["val_accuracy"],
        "numerics": train_cache.parts["numerics"],
        "dtype": train_cache.parts["dtype"],
    }


def _report(name: str, task, rows: dict, results_dir) -> None:
    base = rows["eager fp32"]["seconds"]
    ref_acc = rows["fastft fp32"]["test_accuracy"]
    RESULTS[name] = {
        "task": task.title,
        "notes": task.notes,
        "native_bf16": native_bf16("cpu")[1],
        "modes": {
            mode: {**r, "speedup_vs_eager_fp32": base / r["seconds"]} for mode, r in rows.items()
        },
        "auto_accuracy_delta_points": 100 * (rows["fastft auto"]["test_accuracy"] - ref_acc),
    }
    payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "tasks": RESULTS}
    (results_dir / "extract.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "| task | mode | frozen pass (s) | speed-up vs eager fp32 | test accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for r in RESULTS.values():
        for mode, m in r["modes"].items():
            acc = f"{100 * m['test_accuracy']:.2f}%" if "test_accuracy" in m else "—"
            lines.append(
                f"| {r['task']} | {mode} | {m['seconds']:.1f} | "
                f"{m['speedup_vs_eager_fp32']:.2f}× | {acc} |"
            )
    lines.append(f"\n_Measured {payload['date']} on {payload['machine']}._")
    (results_dir / "extract.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def _measure(name: str, task, batch_size: int, tmp_path, results_dir) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warm = index_rows(task.train[0], torch.arange(min(2 * batch_size, len(task.train[1]))))
    for bf16 in (False, True):  # warm-up (allocator, oneDNN primitives): two batches each
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            task.frozen(warm)
    # Each fastft mode right after the eager loop it is compared with (the machine is shared:
    # neighbours in time see the same load).
    rows = {"eager fp32": {"seconds": _eager_pass(task, False, batch_size)}}
    rows["fastft fp32"] = _fastft_run(task, None, batch_size, tmp_path / "fp32")
    rows["eager bf16"] = {"seconds": _eager_pass(task, True, batch_size)}
    rows["fastft auto"] = _fastft_run(task, "auto", batch_size, tmp_path / "auto")
    _report(name, task, rows, results_dir)


def _once(benchmark, name, task, batch_size, tmp_path, results_dir) -> None:
    """One round of :func:`_measure` (its own clock gives every figure; pytest-benchmark's
    is only what makes ``--benchmark-only`` run it)."""
    benchmark.group = f"extract:{name}"
    benchmark.pedantic(
        _measure, args=(name, task, batch_size, tmp_path, results_dir), rounds=1, iterations=1
    )


def test_minilm_bbc_frozen_pass(benchmark, tmp_path, results_dir):
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    limit = os.environ.get("FASTFT_BENCH_BBC_LIMIT")
    s = BenchSettings(
        max_seq_length=int(os.environ.get("FASTFT_BENCH_SEQ", "256")),
        per_class_limit=int(limit) if limit else None,
        verbose=False,
    )
    _once(benchmark, "bbc", bbc_task(s), 32, tmp_path, results_dir)


def test_digits_cnn_frozen_pass(benchmark, tmp_path, results_dir):
    task = cnn_task(BenchSettings(verbose=False))
    _once(benchmark, "cnn", task, 256, tmp_path, results_dir)
