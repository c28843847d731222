"""k-nearest-neighbour classification on cached features, DINO-style.

Features are L2-normalised; a query's neighbours are the training rows of highest cosine
similarity (ties: the lower row first); each neighbour votes for its class with weight
``exp(similarity / T)`` (T = 0.07 as in DINO and DINOv2); the class with the largest sum wins
(ties: the lower class). Computed in float64, several k from one sort.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from fastft.errors import FastFTValueError
from fastft.probing.heads import Features, HeadResult, accuracy, choose, small_ops

__all__ = ["knn_predict", "knn_head", "TEMPERATURE"]

TEMPERATURE = 0.07


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    ks: Sequence[int],
    num_classes: int,
    *,
    temperature: float = TEMPERATURE,
    chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """``{k: predictions [Q]}`` for every k (a k above the bank's size uses the whole bank)."""
    if not ks or any(int(k) < 1 for k in ks):
        raise FastFTValueError(f"ks must be positive neighbour counts; got {list(ks)}.")
    if len(bank) == 0:
        raise FastFTValueError("kNN needs at least one training row.")
    bank = F.normalize(bank.to(torch.float64), dim=1)
    labels = bank_labels.to(bank.device, torch.long)
    kmax = min(max(int(k) for k in ks), len(bank))
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    with small_ops(bank):
        for start in range(0, len(queries), chunk):
            q = F.normalize(queries[start : start + chunk].to(bank.device, torch.float64), dim=1)
            sims, order = (q @ bank.T).sort(dim=1, descending=True, stable=True)
            weights = (sims[:, :kmax] / temperature).exp()
            votes_for = labels[order[:, :kmax]]
            for k in preds:
                kk = min(k, kmax)
                votes = torch.zeros(len(q), num_classes, dtype=torch.float64, device=bank.device)
                votes.scatter_add_(1, votes_for[:, :kk], weights[:, :kk])
                preds[k].append(votes.argmax(dim=1))
    return {k: torch.cat(p) if p else torch.empty(0, dtype=torch.long) for k, p in preds.items()}


def knn_head(feats: Features, *, ks: Sequence[int], temperature: float = TEMPERATURE) -> HeadResult:
    """Choose k on the validation rows (the fit rows are the bank), score the test rows once."""
    t0 = time.perf_counter()
    ks = list(dict.fromkeys(int(k) for k in ks))
    val = knn_predict(
        feats.fit, feats.y_fit, feats.val, ks, feats.num_classes, temperature=temperature
    )
    val_acc = [accuracy(val[k], feats.y_val) for k in ks]
    k = ks[choose(val_acc)]
    test = knn_predict(
        feats.fit, feats.y_fit, feats.test, [k], feats.num_classes, temperature=temperature
    )[k]
    return HeadResult(
        "knn",
        {"k": k, "T": temperature},
        max(val_acc),
        accuracy(test, feats.y_test),
        time.perf_counter() - t0,
        [{"k": kk, "val_accuracy": a} for kk, a in zip(ks, val_acc)],
    )
