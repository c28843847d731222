"""Hyper-parameter sweeps on one cache: M heads trained in one pass over the features.

Every batch of rows is gathered from the cache once and fed to all M heads; heads of the
same architecture run as one vectorized call (``torch.func.vmap`` over their stacked
weights), so a sweep of learning rates or weight decays costs little more than one head.
Each head still has its own optimizer state (one parameter group per head), so the result
of head m equals a separate ``fit`` with config m (same seed and batch order) to rounding.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from fastft import distributed as fdist
from fastft._graph_step import check_cuda_graph
from fastft.errors import FastFTValueError
from fastft.model.heads import build_head
from fastft.objectives import check_labels
from fastft.trainer import FineTuner, FitConfig, History, _Engine, _metrics, _training_batch_size

SWEEPABLE = {"lr", "weight_decay", "hidden", "seed", "dropout"}


@dataclass
class SweepResult:
    """The outcome of :func:`fit_many`: one history and one trained head per config."""

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


def fit_many(
    ft: FineTuner,
    configs: Sequence[dict],
    train: Any,
    *,
    val: Any = None,
    epochs: int = 10,
    batch_size: int | None = None,
    optimizer: str = "adamw",
    scheduler: str | None = None,
    loss: str = "ce",
    label_smoothing: float = 0.0,
    momentum: float = 0.9,
    vectorize: bool = True,
    keep_best: bool = True,
    dataset_id: str | None = None,
    cuda_graph: bool = False,
) -> SweepResult:
    """Train one head per config (keys: lr, weight_decay, hidden, seed, dropout) in one pass.

    Returns a :class:`SweepResult`; with ``keep_best`` the best head (lowest final
    ``val_loss``, else training loss) is installed in ``ft``, ready for predict/export.
    ``cuda_graph=True`` replays the step of all heads as one CUDA graph (see
    :meth:`FineTuner.fit`).
    """
    if not configs:
        raise FastFTValueError("fit_many needs at least one config.")
    if ft._unfreeze is not None and ft._unfreeze[0]:
        raise FastFTValueError(
            "fit_many trains several heads on one frozen cache; with unfrozen blocks each head would "
            "need its own copy of them. Sweep the heads first, then ft.unfreeze(n) and fit the best one."
        )
    for c in configs:
        unknown = set(c) - SWEEPABLE
        if unknown:
            raise FastFTValueError(
                f"fit_many configs may set {', '.join(sorted(SWEEPABLE))}; got unknown {', '.join(sorted(unknown))}."
            )
    cfg = FitConfig(epochs=epochs, batch_size=_training_batch_size(train, batch_size), lr=configs[0].get("lr", 1e-3),
                    optimizer=optimizer, momentum=momentum, scheduler=scheduler, loss=loss,
                    label_smoothing=label_smoothing, cuda_graph=bool(cuda_graph))
    cfg.validate()
    if cfg.cuda_graph:
        check_cuda_graph(ft.device, cfg, fdist.rank_and_world()[1])
    t_start = time.perf_counter()
    ft.build_cache(train, dataset_id=dataset_id)
    val_cache = ft._build_cache(val, train=False) if val is not None else None
    labels = ft.cache.labels.to(ft.device)

    heads = [_head_for(ft, c) for c in configs]
    check_labels(labels, cfg.loss, ft.num_classes)
    if val_cache is not None:
        check_labels(val_cache.labels, cfg.loss, ft.num_classes, what="val")
    tails = [_tail_with_head(ft, h) for h in heads]
    engine = _Engine(ft, cfg, tails, n_rows=ft.cache.num_rows,
                     per_tail=[{"lr": c.get("lr", cfg.lr), "weight_decay": c.get("weight_decay", cfg.weight_decay)}
                               for c in configs])
    if vectorize:
        engine.forward_all = _VectorizedForward(tails, heads).__call__  # type: ignore[attr-defined]
    histories = [History() for _ in configs]
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        losses = engine.run_epoch(ft.cache, labels)
        seconds = time.perf_counter() - t0
        for m, (hist, tail) in enumerate(zip(histories, tails)):
            record = {"epoch": epoch + 1, "loss": losses[m], "lr": engine.current_lrs()[m], "seconds": seconds}
            if val_cache is not None:
                ft_tail, ft.tail = ft.tail, tail
                try:
                    logits = ft._logits_from_cache(val_cache, cfg.batch_size)
                finally:
                    ft.tail = ft_tail
                record.update({f"val_{k}": v for k, v in _metrics(logits, val_cache.labels.to(logits.device), cfg).items()})
            hist.append(record)
    engine.release_graph()
    metric = "val_loss" if val_cache is not None else "loss"
    finals = [h[-1][metric] for h in histories]
    best = min(range(len(configs)), key=lambda i: finals[i] if not math.isnan(finals[i]) else math.inf)
    for t in tails:
        t.eval()
    if keep_best:
        _install_head(ft, heads[best])
        ft.history = histories[best]
        ft._fit_config = cfg
        ft._fitted = True
    return SweepResult(list(configs), histories, heads, best, time.perf_counter() - t_start, metric)


def _head_for(ft: FineTuner, config: dict) -> nn.Module:
    if ft.head is not None:
        raise FastFTValueError("fit_many builds heads from num_classes/hidden; it cannot sweep a custom head= module.")
    if ft._head_spec is None:
        raise FastFTValueError("fit_many needs a FineTuner that attached a new head (pass num_classes=).")
    return build_head(
        ft._head_spec.in_features, ft.num_classes, config.get("hidden", ft.hidden),
        activation=ft.activation, dropout=config.get("dropout", ft.dropout),
        seed=config.get("seed", ft.seed),
    ).to(ft.device)


def _head_path(root: nn.Module, head: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is head:
            return name
    raise FastFTValueError("the new head is not part of the trainable tail; fit_many cannot swap it.")


def _current_head(ft: FineTuner) -> nn.Module:
    spec = ft._head_spec
    if spec.mode == "replace":
        return ft.model.get_submodule(spec.name)
    # Appended heads are the first new module of the tail.
    from fastft.model import surgery

    return ft.model.get_submodule(surgery.new_modules(ft.model)[0])


def _tail_with_head(ft: FineTuner, head: nn.Module) -> nn.Module:
    """A copy of ft's tail whose new head is ``head`` (the frozen rest is shared by value)."""
    path = _head_path(ft.tail, _current_head(ft))
    tail = copy.deepcopy(ft.tail)
    tail.set_submodule(path, head)
    return tail


def _install_head(ft: FineTuner, head: nn.Module) -> None:
    old = _current_head(ft)
    ft.model.set_submodule(_head_path(ft.model, old), head)
    ft.tail.set_submodule(_head_path(ft.tail, old), head)
    head._fastft_new = True


class _VectorizedForward:
    """Run tails that differ only in their heads' weights as one vmapped call per group."""

    def __init__(self, tails: list[nn.Module], heads: list[nn.Module]):
        self.tails = tails
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(heads):
            has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in h.modules())
            key = ("solo", i) if has_dropout else tuple((n, tuple(p.shape)) for n, p in tails[i].named_parameters() if p.requires_grad)
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

            def one(params, *xs):
                return functional_call(base, params, xs)

            batched = vmap(one, in_dims=(0,) + (None,) * len(taps))(stacked, *taps)
            for k, i in enumerate(idx):
                outs[i] = batched[k]
        return outs  # type: ignore[return-value]
