"""Naive frozen fine-tuning in plain PyTorch, written from fastft's documented promises alone.

Nothing here imports fastft or reads its state. The test builds the *edited* model by hand
(``nn.Sequential(pretrained_body, nn.Linear(d, h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, k))``),
sets ``requires_grad`` by hand, and says which modules train; :func:`naive_fit` then runs the
**whole** model on every batch of every epoch, as fine-tuning without a cache does.

What is reproduced, and from where it is documented:

- **Modes** (README "How caching behaves"; ``FrozenPrefix``/``TrainableTail`` docstrings): the
  frozen part in eval mode (BatchNorm running statistics, no dropout), the new layers and
  unfrozen blocks in train mode. :func:`naive_fit` puts ``model`` in eval mode, then each of
  ``train_modules`` (with everything inside it) in train mode, then ``keep_eval`` back in eval
  mode (BatchNorm of an unfrozen block keeps its running statistics unless ``train_bn``).
- **Batch order** (``fastft.train.engine`` module docstring, ``Engine.run_epoch``): one CPU
  ``torch.Generator().manual_seed(seed)`` per fit (per *stage* of an unfreeze schedule); each
  epoch draws ``perm = torch.randperm(N, generator=g)`` and then, only when the cache holds
  ``K > 1`` views, ``view = torch.randint(K, (N,), generator=g)``: sample ``i`` is read from
  its view ``view[i]`` in that epoch ("each epoch uses one", README). Batches are
  ``perm[s : s + batch_size]``; the last one may be short. See :func:`batch_order`.
- **Dropout stream**: fastft never seeds or forks torch's global generator around training
  (``fastft.train.caches.example_of``: "the global random stream is left as it was: dropout
  ... draws from it"; builds of random views fork it). Dropout in the trained modules thus
  draws from the global generator in forward order, one batch after the other. A test calls
  ``torch.manual_seed(s)`` right before ``ft.fit`` and right before :func:`naive_fit`.
- **Optimizer** (``FitConfig``, fit docstring): ``adamw`` → ``torch.optim.AdamW(groups, lr,
  weight_decay)``, ``adam`` → ``Adam``, ``sgd`` → ``SGD(groups, lr, momentum,
  weight_decay)``; torch's defaults otherwise. See :func:`make_optimizer`.
- **Scheduler**, stepped after every optimizer step over ``total = epochs * ceil(N / batch)``
  steps: ``None`` constant, ``"cosine"`` → ``CosineAnnealingLR(T_max=total)``,
  ``"onecycle"`` → ``OneCycleLR(max_lr=<each group's lr>, total_steps=total)``. These are
  FitConfig's only schedulers. See :func:`make_scheduler`.
- **Loss** (mean reduction): ``"ce"`` → ``CrossEntropyLoss(weight=class_weights,
  label_smoothing=...)`` on integer labels; ``"bce"`` → ``BCEWithLogitsLoss(pos_weight=
  class_weights)`` on float 0/1 targets ``[N, C]``; ``"mse"`` → ``MSELoss`` on float targets
  (``[N]`` targets against an ``[N, 1]`` output are compared as ``[N, 1]``). See
  :func:`make_loss` and :func:`targets_for`.
- **Learning-rate decay** (README "Progressive unfreezing"): block *k* from the top trains at
  ``lr * lr_decay**k``, the new layers at ``lr``: build such groups with :func:`decayed_groups`.
- **Stages** of ``fit(unfreeze=[(epoch, n)])`` (``fastft.train.fitting`` docstring): each
  stage trains like a fit of its own epochs: a fresh optimizer and schedule, the batch order
  drawn from the seed again; the dropout stream just goes on. Call :func:`naive_fit` once per
  stage.

API (all keyword arguments after the data):

- :func:`naive_fit` ``(model, X, y, *, train_modules, epochs, batch_size, lr, optimizer,
  weight_decay, momentum, scheduler, loss, label_smoothing, class_weights, seed, views,
  param_groups, keep_eval) -> list[float]``: trains ``model`` in place; returns each epoch's
  mean training loss (weighted by batch size, like fastft's ``history[i]["loss"]``).
  ``X`` is a tensor or a dict of tensors; with ``views`` (a list of K transformed copies of
  ``X``) the rows are read from ``views[view[i]]`` instead of ``X``.
- :func:`batch_order`, :func:`make_optimizer`, :func:`make_scheduler`, :func:`make_loss`,
  :func:`targets_for`, :func:`decayed_groups`: the pieces above, usable on their own (a
  DDP test may drive its own loop with them).
- :func:`new_layers`: ``[Linear → activation (→ Dropout)] × len(hidden) → Linear`` built
  under ``torch.manual_seed(seed)`` inside a forked generator, in that order (the
  documented meaning of FineTuner's ``seed``: it "seeds the new layers' initialisation").
- :func:`trainable_state`: ``{name: tensor}`` of the parameters with ``requires_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "batch_order",
    "decayed_groups",
    "index_rows",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "naive_fit",
    "new_layers",
    "targets_for",
    "trainable_state",
]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


# ---------------------------------------------------------------------------- pieces
def batch_order(
    n: int, seed: int, epochs: int, views: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(perm, view)`` of each epoch: ``perm`` a permutation of ``range(n)``, ``view[i]`` the
    view sample ``i`` is read from that epoch (None with one view); one generator for all
    epochs of a fit (or of one stage)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        view = torch.randint(views, (n,), generator=g) if views > 1 else None
        out.append((perm, view))
    return out


def make_optimizer(
    params: Sequence[Any],
    *,
    optimizer: str = "adamw",
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The optimizer FitConfig names, over parameters or parameter groups."""
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def make_scheduler(opt: torch.optim.Optimizer, scheduler: str | None, total_steps: int):
    """The per-step schedule FitConfig names (None: a constant rate)."""
    if scheduler is None:
        return None
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps
        )
    raise ValueError(f"unknown scheduler {scheduler!r}")


def make_loss(
    loss: str = "ce", *, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None
) -> nn.Module:
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    if loss == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if loss == "bce":
        return nn.BCEWithLogitsLoss(pos_weight=weight)
    if loss == "mse":
        return nn.MSELoss()
    raise ValueError(f"unknown loss {loss!r}")


def targets_for(y: torch.Tensor, loss: str, out: torch.Tensor) -> torch.Tensor:
    """Labels as the loss takes them for output ``out``."""
    if loss == "ce":
        return y.long()
    t = y.to(out.dtype)
    if loss == "mse" and t.dim() == 1 and out.dim() == 2 and out.shape[1] == 1:
        t = t.unsqueeze(1)
    return t


def decayed_groups(
    new: Sequence[nn.Module], blocks_top_first: Sequence[nn.Module], lr: float, lr_decay: float
) -> list[dict]:
    """Parameter groups: the new layers at ``lr``, block ``k`` from the top (1-based) at
    ``lr * lr_decay**k``."""
    groups = [{"params": [p for m in new for p in m.parameters() if p.requires_grad], "lr": lr}]
    for depth, block in enumerate(blocks_top_first, start=1):
        groups.append({"params": list(block.parameters()), "lr": lr * lr_decay**depth})
    return groups


def new_layers(
    in_features: int,
    num_outputs: int,
    hidden: Sequence[int] = (),
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    seed: int = 0,
) -> list[nn.Module]:
    """The new layers FineTuner documents, as a list to splice into an ``nn.Sequential``;
    initialised under ``torch.manual_seed(seed)`` without touching the global stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = in_features
        for w in hidden:
            layers += [nn.Linear(width, w), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = w
        layers.append(nn.Linear(width, num_outputs))
    return layers


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def index_rows(x: Any, rows: torch.Tensor) -> Any:
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def _rows_of(X: Any, views: Sequence[Any] | None, rows: torch.Tensor, view: torch.Tensor | None):
    if views is None:
        return index_rows(X, rows)
    if isinstance(views[0], dict):
        return {k: torch.stack([v[k] for v in views])[view[rows], rows] for k in views[0]}
    return torch.stack(list(views))[view[rows], rows]


# ---------------------------------------------------------------------------- the loop
def naive_fit(
    model: nn.Module,
    X: Any,
    y: torch.Tensor,
    *,
    train_modules: Sequence[nn.Module],
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    scheduler: str | None = None,
    loss: str = "ce",
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    seed: int = 0,
    views: Sequence[Any] | None = None,
    param_groups: Sequence[dict] | None = None,
    keep_eval: Sequence[nn.Module] = (),
) -> list[float]:
    """Train ``model`` in place the naive way; return each epoch's mean training loss.

    ``train_modules``: the modules that run in train mode (the new layers, unfrozen blocks);
    everything else runs in eval mode. The optimizer gets ``param_groups`` when given, else
    every parameter of ``model`` with ``requires_grad``. ``views``: K transformed copies of
    ``X`` (same rows, same order); sample ``i`` is read from ``views[view[i]]`` in an epoch.
    """
    params = (
        list(param_groups)
        if param_groups is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    opt = make_optimizer(
        params, optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum
    )
    n = len(y)
    sched = make_scheduler(opt, scheduler, epochs * math.ceil(n / batch_size))
    loss_fn = make_loss(loss, label_smoothing=label_smoothing, class_weights=class_weights)
    model.eval()
    for m in train_modules:
        m.train()
    for m in keep_eval:
        m.eval()
    losses = []
    for perm, view in batch_order(n, seed, epochs, 1 if views is None else len(views)):
        total = 0.0
        for start in range(0, n, batch_size):
            rows = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            out = model(_rows_of(X, views, rows, view)).float()
            step_loss = loss_fn(out, targets_for(y[rows], loss, out))
            step_loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += step_loss.item() * rows.numel()
        losses.append(total / n)
    return losses
