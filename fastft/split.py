"""Split an edited model into a frozen prefix (run once per sample, cached) and a trainable tail.

``prefix, tail = split(model, example_inputs)``; then ``tail(*prefix(x))`` equals
``model(x)`` with the model in eval mode. Three methods, tried in this order:

- ``fx``: trace the model with torch.fx (frozen, trainable and new modules as leaves) and
  cut the graph at the frozen frontier. Several taps when a skip connection crosses the cut.
  Frozen modules that run after a new one belong to the tail.
- ``hook``: for models fx cannot trace. The cut is the input of the first trainable module in
  execution order; the prefix runs the model and stops there. Valid when the trainable
  modules run last, as a chain (checked and explained otherwise).
- ``replay``: for untraceable models whose trainable modules do not run last (an encoder with
  its top layers unfrozen): the prefix returns the cut's hidden states and the model's own
  inputs; the tail replays the forward with the frozen modules below the cut skipped (see
  ``fastft._split_replay``).

Every split is checked on the example batch (``check=True``): when the split's output
differs from the model's by more than ``atol``, :class:`~fastft.SplitError` names the first
module whose output differs. The frozen part always runs in eval mode (BatchNorm running
statistics, no dropout); fastft warns (once per model and set of modules, so not again at
every stage of an unfreeze schedule) when frozen dropout or BatchNorm layers were in train
mode.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from fastft import _split_fx, _split_hook, _split_replay
from fastft.model.status import FROZEN_STATS_ATTR, MIXED, NEW, TRAINABLE, classify, eval_mode, eval_modules
from fastft._split_fx import CannotSplit
from fastft.errors import SplitError

__all__ = ["FrozenPrefix", "TrainableTail", "split"]

METHODS = ("auto", "fx", "hook", "replay")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_WARNED_ATTR = "_fastft_warned_train_mode"  # on the model: the modules last warned about


def _shallow(x: Any) -> Any:
    # Some encoders (SentenceTransformer) add their outputs to the input dict: never let them
    # write into the caller's batch.
    return dict(x) if isinstance(x, Mapping) else x


class FrozenPrefix(nn.Module):
    """The frozen part of a split model: ``prefix(x)`` returns a tuple of tap tensors.

    Always runs in eval mode and under ``torch.no_grad()``; ``train(mode)`` changes only its
    own flag. Attributes: ``tap_names`` (one per tap, batch in dim 0 of each) and ``method``
    (``"fx"`` or ``"hook"``). Its parameters are exactly the frozen ones it uses.
    """

    _fastft_prefix = True  # asked for its signature() and key_mask() by the cache key

    def __init__(self, body: nn.Module, tap_names: list[str], method: str, signature: str,
                 key_mask: tuple[list[nn.Module], list[nn.Parameter]] = ([], [])):
        super().__init__()
        self.body = body
        self.tap_names = list(tap_names)
        self.method = method
        self._signature = _ADDRESS.sub("", signature)
        # Plain lists (not registered): the trainable modules run after the cut, in the tail.
        self.__dict__["_key_mask"] = (list(key_mask[0]), list(key_mask[1]))

    def signature(self) -> str:
        """Deterministic text of the frozen structure and the cut (graph code or module
        reprs, tap names): changes with either, never with parameter values or addresses."""
        return self._signature

    def key_mask(self) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules and parameters that were trainable when the model was split: they run
        after the cut, so the cache key leaves them out (training them does not change the
        features). Everything else the prefix can reach counts, frozen or not."""
        return self.__dict__["_key_mask"]

    def _eval_targets(self) -> list[nn.Module]:
        targets = getattr(self.body, "eval_targets", None)
        return targets() if callable(targets) else list(self.body.modules())

    def train(self, mode: bool = True) -> "FrozenPrefix":
        self.training = mode
        for m in self._eval_targets():
            m.training = False
        return self

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), eval_mode(self._eval_targets()):
            return tuple(self.body(_shallow(x)))

    def extra_repr(self) -> str:
        return f"method={self.method!r}, taps={self.tap_names}"


class TrainableTail(nn.Module):
    """The trainable part of a split model: ``tail(*taps)`` returns the model's output.

    Holds the new and unfrozen modules (shared with the model, not copied) and any frozen
    modules that run after them; those stay in eval mode and frozen even under
    ``tail.train()``.
    """

    def __init__(self, body: nn.Module, tap_names: list[str], method: str):
        super().__init__()
        self.body = body
        self.tap_names = list(tap_names)
        self.method = method

    def frozen_modules(self) -> list[nn.Module]:
        """Modules of the tail kept in eval mode (frozen, not inside a trainable module)."""
        # Recomputed only when the tail's modules or requires_grad flags change (a sweep swaps
        # heads in place): classifying every module on every training step would cost more
        # than a small head's forward.
        key = (tuple(map(id, self.body.modules())), tuple(p.requires_grad for p in self.body.parameters()))
        cached = self.__dict__.get("_frozen_cache")
        if cached is None or cached[0] != key:
            cached = (key, [m for m in eval_modules(self.body) if m is not self.body])
            self.__dict__["_frozen_cache"] = cached
        return cached[1]

    def train(self, mode: bool = True) -> "TrainableTail":
        super().train(mode)
        for m in self.frozen_modules():
            m.training = False
        return self

    def forward(self, *taps: torch.Tensor) -> Any:
        with eval_mode(self.frozen_modules()):
            return self.body(*taps)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, taps={self.tap_names}"


def split(
    model: nn.Module,
    example_inputs: Any,
    *,
    atol: float = 1e-5,
    check: bool = True,
    method: str = "auto",
) -> tuple[FrozenPrefix, TrainableTail]:
    """Split ``model`` at its frozen frontier into ``(FrozenPrefix, TrainableTail)``.

    ``example_inputs``: one batch as the model takes it (a tensor or a dict of tensors, batch
    in dim 0; two or more samples make the batch-dimension checks meaningful). Trainable
    means new (added by :mod:`fastft.surgery`) or with ``requires_grad`` parameters.
    ``method``: ``"auto"`` (fx, then hooks, then replay), ``"fx"``, ``"hook"`` or ``"replay"``. With ``check=True``
    the split must reproduce the model in eval mode on the example within ``atol``.

    Both parts share the model's module objects. Raises :class:`~fastft.SplitError` when
    there is nothing to train, nothing frozen, no valid cut, or the parity check fails.
    """
    if method not in METHODS:
        raise SplitError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    _check_inputs(example_inputs)
    status = classify(model)
    if status[id(model)] in (NEW, TRAINABLE):
        raise SplitError(
            "nothing is frozen: every parameter of the model trains, so there is nothing to run once "
            "and cache. Freeze the pretrained layers first (fastft.surgery.freeze(model, except_new=True))."
        )
    if not any(p.requires_grad for p in model.parameters()) and not any(s == NEW for s in status.values()):
        raise SplitError(
            "nothing to train: every parameter is frozen and no module was added. Replace the head "
            "(fastft.surgery.replace_head) or unfreeze some layers (fastft.surgery.unfreeze)."
        )
    _warn_train_mode(model, status)

    reasons: list[str] = []
    parity_error: str | None = None
    builders = {"fx": _split_fx.build, "hook": _split_hook.build, "replay": _split_replay.build}
    for m in (("fx", "hook", "replay") if method == "auto" else (method,)):
        try:
            builder = builders[m]
            body, tail_body, names, signature = builder(model, _shallow(example_inputs), status)
        except CannotSplit as exc:
            reasons.append(f"{m}: {exc}")
            continue
        prefix = FrozenPrefix(body, names, m, signature, key_mask=trainable_parts(model, status))
        tail = TrainableTail(tail_body, names, m)
        if not check:
            return prefix, tail
        problem = _parity(model, prefix, tail, example_inputs, atol)
        if problem is None:
            return prefix, tail
        parity_error = parity_error or f"{m} split: {problem}"
        reasons.append(f"{m}: {problem}")
    if parity_error is not None:
        others = [r for r in reasons if not parity_error.startswith(r.split(":")[0] + " split")]
        raise SplitError(parity_error + ("" if not others else " (also tried " + "; ".join(others) + ")"))
    raise SplitError(
        f"cannot split {type(model).__name__} into a frozen prefix and a trainable tail: "
        + "; ".join(reasons)
        + ". Make the model traceable by torch.fx, or keep the new modules at the end of the "
        "model (replace_head / append_head / insert_layers right before the head)."
    )


def trainable_parts(model: nn.Module, status: dict[int, str]) -> tuple[list[nn.Module], list[nn.Parameter]]:
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
    names = {id(m): n for n, m in model.named_modules()}
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    # BatchNorm layers of unfrozen blocks keep their statistics because the user asked for
    # it (fastft.unfreeze): nothing to warn about.
    offenders = [names.get(id(m), "?") for m in eval_modules(model, status)
                 if isinstance(m, kinds) and m.training and not m.__dict__.get(FROZEN_STATS_ATTR)]
    # A schedule splits the same model again at every stage: say it once per model and set.
    if offenders and model.__dict__.get(_WARNED_ATTR) != offenders:
        model.__dict__[_WARNED_ATTR] = offenders
        shown = ", ".join(repr(n) for n in offenders[:4]) + (", ..." if len(offenders) > 4 else "")
        warnings.warn(
            f"fastft runs the frozen layers in eval mode: {len(offenders)} frozen dropout/BatchNorm "
            f"module(s) were in train mode ({shown}); their eval behaviour is used (running "
            "statistics, no dropout).",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------- parity check
def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, Mapping):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x) if type(x) in (tuple, list) else [_clone(v) for v in x]
    return x


def _diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (inf when their structure differs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return math.inf
        if not (a.is_floating_point() or a.is_complex()):
            return 0.0 if torch.equal(a, b) else math.inf
        if not torch.equal(a.isnan(), b.isnan()):
            return math.inf
        keep = ~a.isnan()
        return float((a[keep].double() - b[keep].double()).abs().max()) if keep.any() else 0.0
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return math.inf
        return max((_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return math.inf
        return max((_diff(x, y) for x, y in zip(a, b)), default=0.0)
    try:
        return 0.0 if a == b else math.inf
    except Exception:
        return math.inf


class _OutputRecorder:
    """Forward hooks on every submodule: each call's output, in completion order."""

    def __init__(self, model: nn.Module):
        self.outputs: dict[str, list[Any]] = {}
        self.order: list[tuple[str, int]] = []
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n]

    def _hook(self, name: str):
        def hook(mod, args, out):
            calls = self.outputs.setdefault(name, [])
            self.order.append((name, len(calls)))
            calls.append(_clone(out))
        return hook

    def reset(self) -> None:
        self.outputs, self.order = {}, []

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _parity(model: nn.Module, prefix: FrozenPrefix, tail: TrainableTail, x: Any, atol: float) -> str | None:
    """None when ``tail(*prefix(x))`` equals ``model(x)`` (eval mode) within atol, else why not."""
    recorder = _OutputRecorder(model)
    try:
        with torch.no_grad(), eval_mode(list(model.modules())):
            want = model(_shallow(x))
            ref, ref_order = recorder.outputs, recorder.order
            recorder.reset()
            try:
                got = tail(*prefix(x))
            except Exception as exc:
                return f"running prefix and tail failed ({type(exc).__name__}: {exc})"
            mine = recorder.outputs
    finally:
        recorder.close()
    total = _diff(want, got)
    if total <= atol:
        return None
    for name, k in ref_order:
        calls = mine.get(name, [])
        if k >= len(calls):
            where = f"module {name!r} ({type(model.get_submodule(name)).__name__}) did not run in the split"
            break
        d = _diff(ref[name][k], calls[k])
        if d > atol:
            where = (f"first divergent module: {name!r} ({type(model.get_submodule(name)).__name__}), "
                     f"its output differs by {d:.3g}")
            break
    else:
        where = ("every module's output agrees, so the difference comes from code in a forward() "
                 "that the split did not reproduce (e.g. data-dependent control flow)")
    return f"the split's output differs from the model's by {total:.3g} (atol {atol:g}); {where}."
