"""Split an edited model into a frozen prefix (run once per sample, cached) and a trainable tail.

``prefix, tail = split(model, example_inputs)``; then ``tail(*prefix(x))`` equals
``model(x)`` with the model in eval mode (its logits, when the model returns them inside a
``ModelOutput``, a dict or a tuple; a dict input goes to the model as keywords or as one
argument, see :mod:`fastft.model.calling`). Three methods, tried in this order:

- ``fx``: trace the model with torch.fx (frozen, trainable and new modules as leaves) and
  cut the graph at the frozen frontier. Several taps when a skip connection crosses the cut.
  Frozen modules that run after a new one belong to the tail.
- ``hook``: for models fx cannot trace. The cut is the input of the first trainable module in
  execution order; the prefix runs the model and stops there. Valid when the trainable
  modules run last, as a chain (checked and explained otherwise).
- ``replay``: for untraceable models whose trainable modules do not run last (an encoder with
  its top layers unfrozen): the prefix returns the cut's hidden states and the model's own
  inputs; the tail replays the forward with the frozen modules below the cut skipped (see
  ``fastft.split.replay``).

Every split is checked on the example batch (``check=True``): when the split's output
differs from the model's by more than ``atol``, :class:`~fastft.SplitError` names the first
module whose output differs. The frozen part always runs in eval mode (BatchNorm running
statistics, no dropout); fastft warns (once per model and set of modules, so not again at
every stage of an unfreeze schedule) when frozen dropout or BatchNorm layers were in train
mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.errors import SplitError
from fastft.model.status import (
    MIXED,
    NEW,
    TRAINABLE,
    classify,
    train_mode_message,
    train_mode_offenders,
    warn_user,
)
from fastft.split import fx, hook, replay
from fastft.split._common import CannotSplit
from fastft.split.parity import parity
from fastft.split.parts import FrozenPrefix, TrainableTail, shallow

__all__ = ["FrozenPrefix", "TrainableTail", "split"]

METHODS = ("auto", "fx", "hook", "replay")
_WARNED_ATTR = "_fastft_warned_train_mode"  # on the model: the modules last warned about


def split(
    model: nn.Module,
    example_inputs: Any,
    *,
    atol: float = 1e-5,
    check: bool = True,
    method: str = "auto",
    warn_train_mode: bool = True,
) -> tuple[FrozenPrefix, TrainableTail]:
    """Split ``model`` at its frozen frontier into ``(FrozenPrefix, TrainableTail)``.

    Trainable means new (added by :mod:`fastft.surgery`) or with ``requires_grad``
    parameters. Both parts share the model's module objects.

    Args:
        model: the edited model (not changed).
        example_inputs: one batch as the model takes it (a tensor or a dict of tensors, batch
            in dim 0; two or more samples make the batch-dimension checks meaningful).
        atol: the largest difference from the model's output the check accepts (default 1e-5).
        check: run the split on ``example_inputs`` and compare it with the model in eval mode
            (default True).
        method: ``"auto"`` (default: fx, then hooks, then replay), ``"fx"``, ``"hook"`` or
            ``"replay"``.
        warn_train_mode: warn when frozen modules whose output depends on the mode (dropout,
            BatchNorm) were in train mode (default True; a FineTuner warns once itself).

    Raises :class:`~fastft.SplitError` when there is nothing to train, nothing frozen, no
    valid cut, or the parity check fails.
    """
    if method not in METHODS:
        raise SplitError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    _check_inputs(example_inputs)
    status = classify(model)
    if status[id(model)] in (NEW, TRAINABLE):
        raise SplitError(
            "nothing is frozen: every parameter of the model trains, so there is nothing to run "
            "once and cache. Freeze the pretrained layers first (fastft.surgery.freeze(model, "
            "except_new=True))."
        )
    if not any(p.requires_grad for p in model.parameters()) and not any(
        s == NEW for s in status.values()
    ):
        raise SplitError(
            "nothing to train: every parameter is frozen and no module was added. Replace the head "
            "(fastft.surgery.replace_head) or unfreeze some layers (fastft.surgery.unfreeze)."
        )
    if warn_train_mode:
        _warn_train_mode(model, status)

    reasons: list[str] = []
    parity_error: str | None = None
    builders = {"fx": fx.build, "hook": hook.build, "replay": replay.build}
    for m in ("fx", "hook", "replay") if method == "auto" else (method,):
        try:
            builder = builders[m]
            body, tail_body, names, signature = builder(model, shallow(example_inputs), status)
        except CannotSplit as exc:
            reasons.append(f"{m}: {exc}")
            continue
        prefix = FrozenPrefix(body, names, m, signature, key_mask=trainable_parts(model, status))
        tail = TrainableTail(tail_body, names, m)
        if not check:
            return prefix, tail
        problem = parity(model, prefix, tail, example_inputs, atol)
        if problem is None:
            return prefix, tail
        parity_error = parity_error or f"{m} split: {problem}"
        reasons.append(f"{m}: {problem}")
    if parity_error is not None:
        others = [r for r in reasons if not parity_error.startswith(r.split(":")[0] + " split")]
        raise SplitError(
            parity_error + ("" if not others else " (also tried " + "; ".join(others) + ")")
        )
    raise SplitError(
        f"cannot split {type(model).__name__} into a frozen prefix and a trainable tail: "
        + "; ".join(reasons)
        + ". Make the model traceable by torch.fx, or keep the new modules at the end of the "
        "model (replace_head / append_head / insert_layers right before the head)."
    )


def trainable_parts(
    model: nn.Module, status: dict[int, str]
) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """The outermost new or trainable modules of ``model`` and the trainable parameters owned
    directly by modules that mix frozen and trainable parts (what runs after the cut)."""
    modules: list[nn.Module] = []
    params: list[nn.Parameter] = []

    def visit(m: nn.Module) -> None:
        s = status.get(id(m))
        if s in (NEW, TRAINABLE):
            modules.append(m)
            return
        if s == MIXED:
            params.extend(p for p in m.parameters(recurse=False) if p.requires_grad)
            for child in m.children():
                visit(child)

    visit(model)
    return modules, params


def _check_inputs(x: Any) -> None:
    if isinstance(x, torch.Tensor):
        ok = x.dim() >= 1
    elif isinstance(x, Mapping):
        ok = any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in x.values())
    else:
        ok = False
    if not ok:
        raise SplitError(
            "example_inputs must be one batch as the model takes it: a tensor or a dict of tensors "
            f"with the batch in dim 0, got {type(x).__name__}."
        )


def _warn_train_mode(model: nn.Module, status: dict[int, str]) -> None:
    # Only modules whose output changes with the mode (see train_mode_offenders).
    offenders = train_mode_offenders(model, status)
    # A schedule splits the same model again at every stage: say it once per model and set.
    if offenders and model.__dict__.get(_WARNED_ATTR) != offenders:
        model.__dict__[_WARNED_ATTR] = offenders
        warn_user(train_mode_message(offenders))
