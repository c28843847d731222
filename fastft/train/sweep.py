"""Hyper-parameter sweeps on one cache: M heads trained in one pass over the features.

Every batch of rows is gathered from the cache once and fed to all M heads; heads of the
same architecture run as one vectorized call (``torch.func.vmap`` over their stacked
weights), so a sweep of learning rates or weight decays costs little more than one head.
Each head still has its own optimizer state (one parameter group per head), so the result
of head m equals a separate ``fit`` with config m (same seed and batch order) to rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from fastft import distributed as fdist
from fastft.errors import FastFTValueError
from fastft.train.config import History, resolve_fit_config
from fastft.train.engine import Engine
from fastft.train.evaluation import cache_metrics
from fastft.train.graph_step import check_cuda_graph
from fastft.train.objectives import check_labels

if TYPE_CHECKING:  # the tuner calls the sweep, not the other way round
    from fastft.train.finetuner import FineTuner

SWEEPABLE = {"lr", "weight_decay", "hidden", "seed", "dropout"}


@dataclass
class SweepResult:
    """The outcome of :func:`fit_many`: one history and one trained head per config.

    Attributes:
        configs: the configs, as given.
        histories: one :class:`History` per config.
        heads: the trained heads, in config order.
        best_index: the config of the lowest final ``metric``.
        seconds: the sweep's wall time.
        metric: what ``best_index`` compares: ``"val_loss"`` with validation data, else
            ``"loss"`` (default).
    """

    configs: list[dict]
    histories: list[History]
    heads: list[nn.Module]
    best_index: int
    seconds: float
    metric: str = field(default="loss")

    @property
    def best(self) -> dict[str, Any]:
        i = self.best_index
        return {"index": i, "config": self.configs[i], "history": self.histories[i]}


#: fit_many's keywords shared by every head: fit's settings (a config's own lr or weight_decay
#: overrides the shared one) and those of the sweep itself.
SHARED = (
    "val",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "scheduler",
    "loss",
    "label_smoothing",
    "class_weights",
    "amp",
    "vectorize",
    "keep_best",
    "dataset_id",
    "cuda_graph",
)


def fit_many(
    ft: FineTuner,
    configs: Sequence[dict],
    train: Any,
    *,
    val: Any = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str | None = None,
    momentum: float | None = None,
    scheduler: str | None = None,
    loss: str | None = None,
    label_smoothing: float | None = None,
    class_weights: Sequence[float] | None = None,
    amp: str | None = None,
    vectorize: bool = True,
    keep_best: bool = True,
    dataset_id: str | None = None,
    cuda_graph: bool | None = None,
    **unknown: Any,
) -> SweepResult:
    """Train one head per config (keys: lr, weight_decay, hidden, seed, dropout) in one pass.

    The keywords are shared by every head and mean what they mean in :meth:`FineTuner.fit`
    (unset ones take :class:`FitConfig`'s defaults: 10 epochs, AdamW, lr 1e-3); a config's
    own ``lr`` or ``weight_decay`` overrides the shared one, e.g.
    ``fit_many([{"hidden": [64]}, {"hidden": [256]}, {"lr": 1e-2}], train, lr=3e-3)``.
    ``hidden``, ``seed`` and ``dropout`` default to the FineTuner's. ``vectorize`` runs heads of
    one shape as one vmapped call.

    Returns a :class:`SweepResult`; with ``keep_best`` the best head (lowest final
    ``val_loss``, else training loss) is installed in ``ft``, ready for predict/export.
    ``cuda_graph=True`` replays the step of all heads as one CUDA graph (see
    :meth:`FineTuner.fit`).
    """
    if unknown:
        raise FastFTValueError(
            f"fit_many got unknown keyword{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(sorted(unknown))}; it takes {', '.join(SHARED)} (shared by every "
            f"head) and, per config, {', '.join(sorted(SWEEPABLE))}."
        )
    if not configs:
        raise FastFTValueError("fit_many needs at least one config.")
    if ft.tuned.unfrozen_blocks:
        raise FastFTValueError(
            "fit_many trains several heads on one frozen cache; with unfrozen blocks each head "
            "would need its own copy of them. Sweep the heads first, then ft.unfreeze(n) and "
            "fit the best one."
        )
    for c in configs:
        if not isinstance(c, dict):
            raise FastFTValueError(
                f"fit_many takes a list of dicts (one per head), got a {type(c).__name__} in it."
            )
        unknown_keys = set(c) - SWEEPABLE
        if unknown_keys:
            raise FastFTValueError(
                f"fit_many configs may set {', '.join(sorted(SWEEPABLE))}; got unknown "
                f"{', '.join(sorted(unknown_keys))} (settings shared by every head are "
                f"keywords of fit_many: {', '.join(SHARED)})."
            )
    cfg = resolve_fit_config(
        None,
        dict(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr if lr is not None else configs[0].get("lr"),
            weight_decay=weight_decay,
            optimizer=optimizer,
            momentum=momentum,
            scheduler=scheduler,
            loss=loss,
            label_smoothing=label_smoothing,
            class_weights=class_weights,
            amp=amp,
            cuda_graph=cuda_graph,
        ),
        train,
    )
    if cfg.cuda_graph:
        check_cuda_graph(ft.device, cfg, fdist.rank_and_world()[1])
    t_start = time.perf_counter()
    ft.build_cache(train, dataset_id=dataset_id)
    val_cache = ft.build_cache(val, evaluation=True) if val is not None else None
    labels = ft.cache.labels.to(ft.device)

    heads = [
        ft.tuned.new_head(**{k: c[k] for k in ("hidden", "dropout", "seed") if k in c})
        for c in configs
    ]
    check_labels(labels, cfg.loss, ft.num_classes)
    if val_cache is not None:
        check_labels(val_cache.labels, cfg.loss, ft.num_classes, what="val")
    tails = [ft.tuned.tail_with_head(h) for h in heads]
    per_tail = [
        {"lr": c.get("lr", cfg.lr), "weight_decay": c.get("weight_decay", cfg.weight_decay)}
        for c in configs
    ]
    engine = Engine(
        cfg,
        tails,
        device=ft.device,
        seed=ft.seed,
        n_rows=ft.cache.num_rows,
        per_tail=per_tail,
        forward_all=VectorizedForward(tails, heads) if vectorize else None,
    )
    histories = [History() for _ in configs]
    try:
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            losses = engine.run_epoch(ft.cache, labels)
            seconds = time.perf_counter() - t0
            for m, (hist, tail) in enumerate(zip(histories, tails)):
                record = {
                    "epoch": epoch + 1,
                    "loss": losses[m],
                    "lr": engine.current_lrs()[m],
                    "seconds": seconds,
                }
                if val_cache is not None:
                    metrics = cache_metrics(tail, val_cache, cfg, device=ft.device)
                    record.update({f"val_{k}": v for k, v in metrics.items()})
                hist.append(record)
    finally:
        engine.release_graph()
    metric = "val_loss" if val_cache is not None else "loss"
    finals = [h[-1][metric] for h in histories]
    best = min(
        range(len(configs)), key=lambda i: finals[i] if not math.isnan(finals[i]) else math.inf
    )
    for t in tails:
        t.eval()
    if keep_best:
        ft.tuned.install_head(heads[best])
        ft.history = histories[best]
        ft.fit_config = cfg
        ft.fitted = True
    return SweepResult(list(configs), histories, heads, best, time.perf_counter() - t_start, metric)


class VectorizedForward:
    """Run tails that differ only in their heads' weights as one vmapped call per group."""

    def __init__(self, tails: list[nn.Module], heads: list[nn.Module]):
        self.tails = tails
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(heads):
            has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in h.modules())
            key = (
                ("solo", i)
                if has_dropout
                else tuple(
                    (n, tuple(p.shape)) for n, p in tails[i].named_parameters() if p.requires_grad
                )
            )
            groups.setdefault(key, []).append(i)
        self.groups = list(groups.values())

    def __call__(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        outs: list[torch.Tensor | None] = [None] * len(self.tails)
        for idx in self.groups:
            if len(idx) == 1:
                outs[idx[0]] = self.tails[idx[0]](*taps)
                continue
            base = self.tails[idx[0]]
            names = [n for n, p in base.named_parameters() if p.requires_grad]
            per_tail = [dict(self.tails[i].named_parameters()) for i in idx]
            stacked = {n: torch.stack([p[n] for p in per_tail]) for n in names}

            def one(params, *xs, base=base):
                return functional_call(base, params, xs)

            batched = vmap(one, in_dims=(0,) + (None,) * len(taps))(stacked, *taps)
            for k, i in enumerate(idx):
                outs[i] = batched[k]
        return outs  # type: ignore[return-value]
