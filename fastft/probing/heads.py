"""Heads trained on one tap's cached features, and the result each family reports.

Every family gets the same four arrays (features and labels of the rows that fit the heads,
of the validation rows) and the test features; it fits its whole grid, chooses the setting
with the best validation accuracy (ties: the earlier setting of the grid), and scores the
test rows once, with that setting only.

- **linear** and **mlp** heads: one :meth:`fastft.FineTuner.fit_many` per tap, all the grid's
  heads trained together in one pass over the features (each equal to a ``fit`` with its
  settings, same seed and batch order); the tap's features are the tuner's input, so its
  frozen part is the identity and the backbone never runs again.
- **logreg** (:mod:`~fastft.probing.logreg`) and **knn** (:mod:`~fastft.probing.knn`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fastft.train import FineTuner

__all__ = ["HeadResult", "Features", "linear_heads", "choose", "accuracy", "small_ops"]

#: Below this many feature values (rows × columns) a tap's heads run on one CPU thread: their
#: ops are so small that handing them to a thread pool costs more than it saves (on a busy
#: 2-core machine, 10-30x more).
ONE_THREAD_BELOW = 2**22


@contextmanager
def small_ops(x: torch.Tensor) -> Iterator[None]:
    """One torch thread while heads train on small CPU features ``x`` (see ONE_THREAD_BELOW)."""
    before = torch.get_num_threads()
    small = x.device.type == "cpu" and x.numel() < ONE_THREAD_BELOW
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


@contextmanager
def quiet_caches() -> Iterator[None]:
    """The heads' own small caches (of a tap's features) are not worth a log line each."""
    log = logging.getLogger("fastft.cache")
    before = log.level
    log.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(before)


@dataclass
class Features:
    """One tap's features for the protocol's three sets of rows, and the number of classes."""

    fit: torch.Tensor
    y_fit: torch.Tensor
    val: torch.Tensor
    y_val: torch.Tensor
    test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


@dataclass
class HeadResult:
    """A head family's outcome on one tap: the chosen setting, its validation and test
    accuracy, the validation accuracy of every setting of the grid, and the seconds spent
    (fitting the whole grid, choosing, scoring)."""

    head: str
    chosen: dict
    val_accuracy: float
    test_accuracy: float
    seconds: float
    grid: list[dict] = field(default_factory=list)  # {**setting, "val_accuracy": ...}
    model: Any = None  # the chosen trained head (a module, or the logreg weights)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y`` (0.0 for no rows)."""
    return float((pred.cpu() == y.cpu()).float().mean()) if len(y) else 0.0


def choose(scores: Sequence[float], tiebreak: Sequence[float] | None = None) -> int:
    """Index of the best validation accuracy; ties go to the lower ``tiebreak`` (a loss),
    then to the earlier setting. NaN never wins."""

    def key(i: int) -> tuple[float, float, int]:
        s = scores[i]
        t = tiebreak[i] if tiebreak is not None else 0.0
        return (-(s if not math.isnan(s) else -math.inf), t if not math.isnan(t) else math.inf, i)

    return min(range(len(scores)), key=key)


def linear_heads(
    feats: Features,
    *,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    hidden: Sequence[int] = (),
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    name: str = "linear",
) -> HeadResult:
    """Train one head per (lr, weight decay) of the grid together, choose on validation,
    score the test rows with the chosen head.

    ``hidden=[h]`` makes them MLP heads (Linear-ReLU-Linear). AdamW, cross-entropy, the
    FineTuner's seeded initialisation and batch order: head m equals
    ``FineTuner(..., seed=seed).fit(fit rows, epochs=epochs, batch_size=batch_size,
    lr=lrs[i], weight_decay=weight_decays[j])`` on the same features.
    """
    t0 = time.perf_counter()
    configs = [
        {"lr": float(lr), "weight_decay": float(wd), **({"hidden": list(hidden)} if hidden else {})}
        for lr, wd in itertools.product(lrs, weight_decays)
    ]
    tuner = FineTuner(
        nn.Identity(),
        num_classes=feats.num_classes,
        cache="host",
        cache_dtype="fp32",
        seed=seed,
        device=device,
        verbose=False,
    )
    with quiet_caches(), small_ops(feats.fit):
        sweep = tuner.fit_many(
            configs,
            (feats.fit.float(), feats.y_fit),
            epochs=epochs,
            batch_size=min(batch_size, len(feats.y_fit)),
            keep_best=False,
        )
        # Scored here, once, rather than by fit_many after every epoch: only the last counts.
        val_acc, val_loss = [], []
        with torch.no_grad():
            for head in sweep.heads:
                logits = head.eval()(feats.val.to(next(head.parameters()).device).float())
                y_val = feats.y_val.to(logits.device)
                val_acc.append(accuracy(logits.argmax(-1), y_val))
                val_loss.append(float(F.cross_entropy(logits, y_val)) if len(y_val) else 0.0)
        best = choose(val_acc, val_loss)
        head = sweep.heads[best]
        with torch.no_grad():
            pred = head(feats.test.to(next(head.parameters()).device).float()).argmax(-1)
    grid = [
        {"lr": c["lr"], "weight_decay": c["weight_decay"], "val_accuracy": a}
        for c, a in zip(configs, val_acc)
    ]
    chosen = {k: v for k, v in grid[best].items() if k != "val_accuracy"}
    if hidden:
        chosen["hidden"] = list(hidden)
    return HeadResult(
        name,
        chosen,
        val_acc[best],
        accuracy(pred, feats.y_test),
        time.perf_counter() - t0,
        grid,
        head,
    )
