"""What the split methods share: the "does not apply" signal, module calls recorded on an
example, the trainable units of a model, and the signature of a cut at a module's input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastft.model.calling import call_model
from fastft.model.status import MIXED, NEW, TRAINABLE, all_eval


class CannotSplit(Exception):
    """This split method does not apply to the model; the message says why."""


def batch_size(example: Any) -> int:
    t = (
        example
        if isinstance(example, torch.Tensor)
        else next(v for v in example.values() if isinstance(v, torch.Tensor))
    )
    return int(t.shape[0]) if t.dim() else 0


@dataclass
class Call:
    name: str
    module: nn.Module
    index: int
    parent: Call | None
    args: tuple
    kwargs: dict
    output: Any = field(default=None)


def record_calls(model: nn.Module, example: Any) -> list[Call]:
    """Every module call of one forward, in the order they start, with inputs and outputs."""
    calls: list[Call] = []
    stack: list[Call] = []
    handles = []

    def pre(name):
        def hook(mod, args, kwargs):
            call = Call(name, mod, len(calls), stack[-1] if stack else None, args, kwargs)
            calls.append(call)
            stack.append(call)

        return hook

    def post(mod, args, kwargs, output):
        stack.pop().output = output

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), all_eval(model):
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return calls


def units(model: nn.Module, status: dict[int, str]) -> dict[int, str]:
    """Outermost modules that train: new, wholly trainable, or owning a trainable parameter."""
    units: dict[int, str] = {}
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") or t == "" for t in taken):
            continue
        s = status.get(id(m))
        if s in (NEW, TRAINABLE) or (
            s == MIXED and any(p.requires_grad for p in m.parameters(recurse=False))
        ):
            units[id(m)] = name
            taken.append(name)
    return units


def signature_text(
    method: str,
    model: nn.Module,
    cut: str,
    cut_module: nn.Module,
    names: list[str],
    frozen_ran: list[str],
    cut_note: str = "",
) -> str:
    """The prefix signature of a cut at a module's input: method, model class, cut, taps, and
    the frozen modules that run before it (their reprs)."""
    lines = [
        f"method: {method}",
        f"model: {type(model).__module__}.{type(model).__qualname__}",
        f"cut: input of {cut} ({type(cut_module).__qualname__}){cut_note}",
        f"taps: {names}",
    ] + [f"{n} = {model.get_submodule(n)!r}" for n in frozen_ran]
    return "\n".join(lines)


def outermost(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n not in out and not any(n.startswith(o + ".") for o in out):
            out = [o for o in out if not o.startswith(n + ".")] + [n]
    return out
