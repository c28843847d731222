"""``fastft bench --unfreeze``: progressive unfreezing, naive vs fastft, measured in one run.

all-MiniLM-L6-v2 on BBC News with a new 384-256-5 head: ``head_epochs`` head-only epochs,
then the top ``blocks`` transformer layer(s) unfrozen for ``block_epochs`` more, with the
layers' learning rate ``lr * lr_decay ** depth``.

- **naive**: plain PyTorch. Every step runs the whole encoder (frozen layers in eval mode);
  in the second stage the gradient flows back into the unfrozen layer.
- **fastft**: ``FineTuner.fit(epochs=H+B, unfreeze=[(H, blocks)], lr_decay=...)`` on a fresh
  cache: one frozen pass for the head stage, one pass to the cut below the unfrozen layer
  for the second stage, then only that layer and the head run per epoch.

Both start from the same seeded head, draw the same batch order and the same dropout stream
(the global generator seeded before each), so their accuracies differ only by the cache's
fp16 rounding. Test accuracy is
measured after each stage and timed apart (both methods pay a test pass). Writes
``<out>/unfreeze[_quick].json``; on a 2-core CPU the default run (1780 training articles at
128 tokens) takes about 7 minutes, ``--quick`` (250 articles at 64 tokens) about 1 minute.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import fastft
from fastft.bench.tasks import (
    BenchSettings,
    Task,
    accuracy,
    bbc_task,
    index_rows,
    machine,
    quick_defaults,
)
from fastft.model.blocks import find_blocks


@dataclass
class UnfreezeSettings:
    head_epochs: int = 5
    block_epochs: int = 3
    blocks: int = 1
    quick: bool = False
    max_seq_length: int | None = None  # default 128, or 64 with quick
    per_class_limit: int | None = None  # default all articles, or 50 per class with quick
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.1
    cache_dtype: str = "fp16"
    seed: int = 0
    verbose: bool = True

    def __post_init__(self):
        quick_defaults(self)
        if self.head_epochs < 1 or self.block_epochs < 1 or self.blocks < 1:
            raise fastft.FastFTValueError("head_epochs, block_epochs and blocks must be ≥ 1.")


def _task(s: UnfreezeSettings) -> Task:
    return bbc_task(
        BenchSettings(
            tasks=("bbc",),
            max_seq_length=s.max_seq_length,
            per_class_limit=s.per_class_limit,
            seed=s.seed,
            quick=s.quick,
        )
    )


def run_naive(task: Task, s: UnfreezeSettings) -> dict:
    """Plain PyTorch: the whole encoder on every batch, the top layer(s) trained in stage 2."""
    torch.manual_seed(s.seed)  # the unfrozen layer's dropout: the same stream as fastft's
    encoder, head = copy.deepcopy(task.model).eval(), copy.deepcopy(task.head)
    encoder.requires_grad_(False)
    top = [m for _, m in find_blocks(encoder)][-s.blocks :]
    X, y = task.train
    forward = lambda x: head(encoder(x)["sentence_embedding"])  # noqa: E731
    frozen = lambda x: encoder(x)["sentence_embedding"]  # noqa: E731

    def stage(name: str, epochs: int, groups: list[dict], train_top: bool) -> float:
        opt = torch.optim.AdamW(groups, lr=s.lr)
        g = torch.Generator().manual_seed(s.seed)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            head.train()
            for block in top:
                block.train(train_top)
            perm = torch.randperm(len(y), generator=g)
            for start in tqdm(
                range(0, len(y), s.batch_size),
                desc=f"naive {name} epoch {epoch + 1}",
                leave=False,
                disable=not s.verbose,
                unit="batch",
            ):
                rows = perm[start : start + s.batch_size]
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(forward(index_rows(X, rows)), y[rows]).backward()
                opt.step()
        return time.perf_counter() - t0

    head_seconds = stage("head", s.head_epochs, [{"params": list(head.parameters())}], False)
    head_accuracy = accuracy(frozen, head, task.test)
    for block in top:
        block.requires_grad_(True)
    groups = [{"params": list(head.parameters())}] + [
        {"params": list(b.parameters()), "lr": s.lr * s.lr_decay**depth}
        for depth, b in enumerate(reversed(top), start=1)
    ]
    block_seconds = stage("unfrozen", s.block_epochs, groups, True)
    for block in top:
        block.eval()
    return {
        "seconds": head_seconds + block_seconds,
        "head_stage_seconds": head_seconds,
        "head_stage_accuracy": head_accuracy,
        "accuracy": accuracy(frozen, head, task.test),
    }


def run_fastft(task: Task, s: UnfreezeSettings) -> dict:
    """FineTuner with an unfreeze schedule, on a fresh cache."""
    accuracy, eval_seconds, stage_end = {}, [0.0], [0.0]
    t0 = time.perf_counter()

    def probe(ft, record):  # test accuracy after each stage, timed apart
        if record["epoch"] in (s.head_epochs, s.head_epochs + s.block_epochs):
            if record["epoch"] == s.head_epochs:
                stage_end[0] = time.perf_counter() - t0 - eval_seconds[0]
            t1 = time.perf_counter()
            accuracy[record["epoch"]] = float(ft.evaluate(task.test)["accuracy"])
            eval_seconds[0] += time.perf_counter() - t1

    torch.manual_seed(s.seed)  # the unfrozen layer's dropout: the same stream as the naive loop's
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as cache_dir:
        ft = fastft.FineTuner(
            copy.deepcopy(task.model),
            head=copy.deepcopy(task.head),
            cache="host",
            cache_dtype=s.cache_dtype,
            cache_dir=cache_dir,
            seed=s.seed,
            verbose=s.verbose,
        )
        t0 = time.perf_counter()
        ft.fit(
            task.train,
            epochs=s.head_epochs + s.block_epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            unfreeze=[(s.head_epochs, s.blocks)],
            lr_decay=s.lr_decay,
            callbacks=[probe],
        )
        total = time.perf_counter() - t0 - eval_seconds[0]
        cut_cache = ft.cache
    return {
        "seconds": total,
        "head_stage_seconds": stage_end[0],
        "head_stage_accuracy": accuracy[s.head_epochs],
        "accuracy": accuracy[s.head_epochs + s.block_epochs],
        "cut": cut_cache.taps[0].name,
        "cut_cache_bytes": int(cut_cache.nbytes),
        "cut_build_seconds": float(cut_cache.telemetry.get("build_seconds", 0.0)),
    }


def run(s: UnfreezeSettings, log: Callable[[str], None] = print) -> dict:
    """Both methods on the same task; the speed-up is naive seconds / fastft seconds."""
    log("[unfreeze] preparing all-MiniLM-L6-v2 and BBC News")
    task = _task(s)
    log(
        f"[unfreeze] {len(task.train[1])} train / {len(task.test[1])} test articles at "
        f"{s.max_seq_length} tokens; naive: {s.head_epochs} head + {s.block_epochs} unfrozen epochs"
    )
    naive = run_naive(task, s)
    log(f"[unfreeze] naive took {naive['seconds']:.1f} s; fastft")
    mine = run_fastft(task, s)
    return {
        "naive": naive,
        "fastft": mine,
        "speedup": naive["seconds"] / mine["seconds"],
        "train_samples": len(task.train[1]),
        "test_samples": len(task.test[1]),
    }


def write(result: dict, s: UnfreezeSettings, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("unfreeze_quick.json" if s.quick else "unfreeze.json")
    load = dict(zip(("load_1min", "load_5min", "load_15min"), os.getloadavg()))
    path.write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "machine": machine(),
                "load_average": load,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                **result,
            },
            indent=2,
        )
    )
    return path


def table(result: dict, s: UnfreezeSettings) -> str:
    """The result as the Markdown table of docs/benchmarks.md."""
    lines = [
        "| method | seconds | after the head stage | after unfreezing | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("naive", "fastft"):
        r = result[name]
        speedup = 1.0 if name == "naive" else result["speedup"]
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {100 * r['head_stage_accuracy']:.2f}% | "
            f"{100 * r['accuracy']:.2f}% | {speedup:.1f}x |"
        )
    return "\n".join(lines)
