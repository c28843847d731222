"""The parity check of a split: ``tail(*prefix(x))`` must equal ``model(x)`` in eval mode, and
when it does not, the first module whose output differs is named."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.model.calling import call_model, logits_of, structured_output
from fastft.model.status import eval_mode
from fastft.split.parts import FrozenPrefix, TrainableTail, shallow


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
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n
        ]

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


def parity(
    model: nn.Module, prefix: FrozenPrefix, tail: TrainableTail, x: Any, atol: float
) -> str | None:
    """None when ``tail(*prefix(x))`` equals ``model(x)`` (eval mode) within atol, else why not."""
    recorder = _OutputRecorder(model)
    try:
        with torch.no_grad(), eval_mode(list(model.modules())):
            want = call_model(model, shallow(x))
            ref, ref_order = recorder.outputs, recorder.order
            recorder.reset()
            try:
                got = tail(*prefix(x))
            except Exception as exc:
                return f"running prefix and tail failed ({type(exc).__name__}: {exc})"
            mine = recorder.outputs
    finally:
        recorder.close()
    if isinstance(got, torch.Tensor) and structured_output(want):
        want = logits_of(want)  # the tail gives the logits of a ModelOutput / tuple output
    total = _diff(want, got)
    if total <= atol:
        return None
    for name, k in ref_order:
        calls = mine.get(name, [])
        if k >= len(calls):
            where = (
                f"module {name!r} ({type(model.get_submodule(name)).__name__}) did not run in "
                "the split"
            )
            break
        d = _diff(ref[name][k], calls[k])
        if d > atol:
            where = (
                f"first divergent module: {name!r} ({type(model.get_submodule(name)).__name__}), "
                f"its output differs by {d:.3g}"
            )
            break
    else:
        where = (
            "every module's output agrees, so the difference comes from code in a forward() "
            "that the split did not reproduce (e.g. data-dependent control flow)"
        )
    return f"the split's output differs from the model's by {total:.3g} (atol {atol:g}); {where}."
