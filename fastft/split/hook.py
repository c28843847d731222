"""The hook split, for models torch.fx cannot trace (data-dependent control flow, HF models).

The cut is the input of the first trainable module in execution order. The prefix runs the
model and stops there: a forward-pre-hook captures that module's inputs and raises an
internal exception that aborts the rest of the forward. The tail is the chain of modules
that ran after the cut, each fed the previous one's output.

That is only right when the trainable modules run last, as a chain: after the cut only
trainable modules (and stateless ones such as ReLU) may run, each once, each taking exactly
the previous one's output, and the model must return the last one's output, as is or as the
logits of what it returns (a Hugging Face ``ModelOutput``, a tuple). A single recorded
forward on the example checks all of that and explains what breaks it. Whatever the model
computes in code before the cut (a ViT's ``[:, 0]``, BERT's pooler and dropout) runs in the
prefix, so the cache holds only what the head reads; a decoder classifier's last-token pick
after a per-token head is moved before the head (:mod:`fastft.split.pick`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastft.errors import SplitError
from fastft.model.calling import call_model, logits_of, structured_output
from fastft.model.status import MIXED, NEW, TRAINABLE
from fastft.split._common import (
    CannotSplit,
    batch_size,
    outermost,
    record_calls,
    signature_text,
    units,
)
from fastft.split.pick import LastTokenPick, plan


class _Stop(BaseException):
    """Raised by the cut's pre-hook to end the frozen forward early. A BaseException, so
    that a model's own ``except Exception`` cannot swallow it."""


def _stateless(m: nn.Module) -> bool:
    return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())


def _tensors_only(args: tuple, kwargs: dict) -> bool:
    return all(isinstance(a, torch.Tensor) for a in args) and all(
        v is None for v in kwargs.values()
    )


def build(model: nn.Module, example: Any, status: dict[int, str]):
    """Return ``(prefix body, tail body, tap names, signature text)``."""
    trainable_units = units(model, status)
    calls = record_calls(model, example)
    start = next((c for c in calls if id(c.module) in trainable_units), None)
    if start is None:
        raise CannotSplit("no trainable module runs on the example inputs")
    if start.index == 0:
        raise CannotSplit(
            "the model's own forward uses trainable parameters: nothing frozen runs before them"
        )
    cut = start.name
    chain = [
        c for c in calls[start.index :] if c.parent is not None and c.parent.index < start.index
    ]
    seen: set[int] = set()
    for prev, c in zip([None, *chain[:-1]], chain):
        if id(c.module) in trainable_units:
            if id(c.module) in seen:
                raise CannotSplit(f"the trainable module {c.name!r} runs more than once")
            seen.add(id(c.module))
        elif not _stateless(c.module):
            raise CannotSplit(
                f"the frozen module {c.name!r} runs after the trainable module {cut!r}: the "
                "trainable modules do not run last as a chain, and only a traced graph could cut "
                "such a model"
            )
        if prev is None:
            if not _tensors_only(c.args, c.kwargs) or not c.args:
                raise CannotSplit(
                    f"{cut!r} is called with non-tensor or keyword inputs; the cut must be tensors"
                )
        elif (
            len(c.args) != 1 or c.args[0] is not prev.output or not _tensors_only(c.args, c.kwargs)
        ):
            if (
                id(c.module) in trainable_units
                and id(prev.module) in trainable_units
                and _parallel(prev, c)
            ):
                raise CannotSplit(
                    f"the trainable modules {prev.name!r} and {c.name!r} read different inputs "
                    "and the model's code combines their outputs (two heads, as a distilled "
                    "model has); only a traced graph could cut that. Use the model's single-head "
                    "form (a classifier without distillation head)"
                )
            raise CannotSplit(
                f"{c.name!r} does not take exactly the output of {prev.name!r} (code runs between "
                "them), so the modules after the cut are not a chain"
            )
    out, last = calls[0].output, chain[-1].output
    pick = None
    if out is not last and not (structured_output(out) and logits_of(out) is last):
        # A decoder classifier's last-token pick after a per-token head: moved before it.
        pick = plan(model, example, [c.module for c in chain], last, logits_of(out))
        if pick is None:
            raise CannotSplit(
                f"the model does not return the output of its last module {chain[-1].name!r} "
                f"as is, nor as the logits of its output (it returns {type(out).__name__} "
                "built from it)"
            )
    batch = batch_size(example)
    for i, t in enumerate(start.args):
        if t.dim() == 0 or t.shape[0] != batch:
            raise CannotSplit(
                f"input {i} of {cut!r} has shape {tuple(t.shape)}, not [batch={batch}, ...]"
            )

    frozen_ran = outermost(
        [
            c.name
            for c in calls[1 : start.index]
            if status.get(id(c.module)) not in (NEW, TRAINABLE, MIXED)
        ]
    )
    tail = _Chain([c.module for c in chain], [c.name for c in chain])
    if pick is not None:
        body = PickPrefix(model, start.module, cut, frozen_ran, status, pick)
        names = [f"{cut}.input.last_token"]
        note = f", one token per sample ({pick.extra_repr()})"
        return (
            body,
            tail,
            names,
            signature_text("hook", model, cut, start.module, names, frozen_ran, note),
        )
    body = HookPrefix(model, start.module, cut, frozen_ran, status)
    names = (
        [f"{cut}.input"]
        if len(start.args) == 1
        else [f"{cut}.input{i}" for i in range(len(start.args))]
    )
    return body, tail, names, signature_text("hook", model, cut, start.module, names, frozen_ran)


def _parallel(a: Any, b: Any) -> bool:
    """Whether call ``b`` reads an input like ``a``'s own, not like ``a``'s output: two heads
    side by side (a class and a distillation head), not one after the other."""
    first = a.args[0] if a.args else None
    take = b.args[0] if b.args else None
    out = a.output
    return (
        all(isinstance(t, torch.Tensor) for t in (first, take, out))
        and take.shape == first.shape
        and take.shape != out.shape
    )


class HookPrefix(nn.Module):
    """Runs the model up to the cut and returns the cut module's inputs.

    The model is held without being registered as a submodule, so that the prefix's
    parameters are only the frozen ones that run before the cut (the cache fingerprint
    hashes them; the new head's weights must not count). Those modules are registered
    under their model names in ``frozen``; frozen parameters and buffers owned directly by
    mixed containers (e.g. a class token) are registered too.
    """

    def __init__(
        self,
        model: nn.Module,
        cut: nn.Module,
        cut_name: str,
        frozen: list[str],
        status: dict[int, str],
    ):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_cut", cut)
        self.cut_name = cut_name
        self.frozen = nn.Module()
        self._direct_buffers: list[tuple[nn.Module, str, nn.Module]] = []
        for name in frozen:
            self._place(name).add_module(name.rpartition(".")[2], model.get_submodule(name))
        for name, m in model.named_modules():
            if status.get(id(m)) != MIXED:
                continue
            holder = None
            for pname, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    holder = holder or self._place(f"{name}.x" if name else "x")
                    holder.register_parameter(pname, p)
            for bname, b in m.named_buffers(recurse=False):
                holder = holder or self._place(f"{name}.x" if name else "x")
                holder.register_buffer(bname, b)
                self._direct_buffers.append((m, bname, holder))

    def _place(self, name: str) -> nn.Module:
        """The holder module for ``name``'s parent path, creating plain modules on the way."""
        node = self.frozen
        for part in name.split(".")[:-1]:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        return node

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # .to()/.half() replace buffer tensors in the holder only; give them to their owners.
        for owner, bname, holder in self._direct_buffers:
            owner._buffers[bname] = holder._buffers[bname]
        return self

    def eval_targets(self) -> list[nn.Module]:
        return list(self._model.modules())

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        return tuple(self.run_to_cut(x)[0])

    def run_to_cut(self, x: Any) -> tuple[tuple, dict]:
        """The cut module's (args, kwargs) on ``x``; the model's forward stops there."""
        captured: list[tuple[tuple, dict]] = []

        def stop(mod, args, kwargs):
            captured.append((args, kwargs))
            raise _Stop

        handle = self._cut.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            call_model(self._model, x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise SplitError(
                f"the model's forward finished without reaching {self.cut_name!r} on this input, "
                "so the frozen prefix has no output; the cut found on the example inputs does not "
                "hold here."
            )
        return captured[0]


class PickPrefix(HookPrefix):
    """The hook prefix of a decoder classifier: the cut's per-token input, one row per sample
    (the token the model's logits come from; see :mod:`fastft.split.pick`)."""

    def __init__(self, model, cut, cut_name, frozen, status, pick: LastTokenPick):
        super().__init__(model, cut, cut_name, frozen, status)
        self.pick = pick

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        ids = x["input_ids"]  # before the forward: a model may add to its input dict
        return (self.pick(self.run_to_cut(x)[0][0], ids),)


class _Chain(nn.Module):
    """``steps[-1](... steps[1](steps[0](*taps)))``: the modules after a hook cut."""

    def __init__(self, modules: list[nn.Module], names: list[str]):
        super().__init__()
        self.steps = nn.ModuleList(modules)
        self.names = list(names)

    def forward(self, *taps: torch.Tensor) -> Any:
        x = self.steps[0](*taps)
        for step in self.steps[1:]:
            x = step(x)
        return x
