"""The replay split, for models torch.fx cannot trace whose trainable modules do not run last
as a chain: typically a Hugging Face encoder with its top layers unfrozen, where the frozen
pooler, the pooling and the normalisation run after them and the layers take masks built by
code that is not a module.

The cut is the input of the first trainable module in execution order, as in the hook split.
The prefix runs the model up to the cut and returns two kinds of taps: the cut module's first
positional input, or its ``hidden_states=`` keyword when it is called so (the hidden states,
the expensive part), and the model's own tensor inputs (token ids, attention mask: a few
numbers per position).

The tail *replays* the model's forward on the cached inputs: the frozen modules that ran
before the cut are skipped (each returns a zero placeholder of its recorded output's
shape instead of computing), and the cut module receives the cached hidden states. Code
outside modules (mask preparation, pooling arithmetic) and frozen modules after the cut (a
pooler) run as usual: they are cheap next to the skipped layers. A skipped module's own
instance ``forward`` (accelerate's hooks set one) is restored when the replay ends, also
when the model raises. The swap is on the module objects: replays of several threads take
turns (a lock), but a plain forward of the model in another thread during a replay would
see the placeholders. Only modules whose output has the shape of the hidden states are
skipped; anything else (rotary tables, say) is recomputed. Code that reads a skipped
module's output other than through the cut (a branch on the embeddings' values, say) would
see zeros: the parity check on the example batch, which must reproduce the model within
``atol``, is what rules that out.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fastft.model.calling import call_model
from fastft.model.status import FROZEN
from fastft.split._common import (
    CannotSplit,
    batch_size,
    outermost,
    record_calls,
    signature_text,
    units,
)
from fastft.split.hook import HookPrefix

_NONE = object()  # no instance attribute
_REPLAY_LOCK = threading.RLock()  # re-entrant: a derived cache replays inside a replay's thread


def _skippable(output: Any, shape: torch.Size) -> bool:
    """Whether a module's output is the hidden-states stream (or a tuple of it and Nones)."""
    if isinstance(output, torch.Tensor):
        return output.shape == shape
    if isinstance(output, (tuple, list)) and output:
        return isinstance(output[0], torch.Tensor) and all(
            o is None or (isinstance(o, torch.Tensor) and o.shape == shape) for o in output
        )
    return False


def _layout(output: Any) -> tuple[bool, ...] | None:
    """None for a tensor output; for a tuple, which of its items are tensors (else None)."""
    return (
        None
        if isinstance(output, torch.Tensor)
        else tuple(isinstance(o, torch.Tensor) for o in output)
    )


def _input_keys(example: Any) -> list[str] | None:
    """Keys of the batch-major tensors of a dict input (None: the input is one tensor)."""
    if isinstance(example, torch.Tensor):
        return None
    batch = batch_size(example)
    return [
        k
        for k, v in example.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch
    ]


def build(model: nn.Module, example: Any, status: dict[int, str]):
    """Return ``(prefix body, tail body, tap names, signature text)``."""
    if not isinstance(example, (torch.Tensor, Mapping)):
        raise CannotSplit("the model input is neither a tensor nor a dict of tensors")
    keys = _input_keys(example)  # before the forward: some encoders add their outputs to the dict
    trainable_units = units(model, status)
    calls = record_calls(model, example if keys is None else dict(example))
    start = next((c for c in calls if id(c.module) in trainable_units), None)
    if start is None:
        raise CannotSplit("no trainable module runs on the example inputs")
    if start.index == 0:
        raise CannotSplit(
            "the model's own forward uses trainable parameters: nothing frozen runs before them"
        )
    if sum(c.module is start.module for c in calls) != 1:
        raise CannotSplit(f"the first trainable module {start.name!r} runs more than once")
    batch = batch_size(example)
    slot = _hidden_slot(start.args, start.kwargs, batch)
    if slot is None:
        raise CannotSplit(
            f"{start.name!r} takes no float [batch={batch}, ...] tensor as its first positional "
            "input or as a keyword (hidden_states=...)"
        )
    main = start.args[0] if slot == 0 else start.kwargs[slot]

    frozen_ran = outermost(
        [c.name for c in calls[1 : start.index] if status.get(id(c.module)) == FROZEN]
    )
    by_name = {}
    for c in calls:
        by_name.setdefault(c.name, []).append(c)
    skip = [
        (model.get_submodule(n), _layout(by_name[n][0].output))
        for n in frozen_ran
        if len(by_name[n]) == 1 and _skippable(by_name[n][0].output, main.shape)
    ]
    if not skip:
        raise CannotSplit(
            f"no frozen module before {start.name!r} produces its input, so there is nothing to "
            "skip"
        )
    cut = start.name
    prefix = _ReplayPrefix(model, start.module, cut, frozen_ran, status, keys, slot)
    tail = ReplayTail(model, start.module, skip, keys, slot)
    names = [f"{cut}.input"] + (["input"] if keys is None else [f"input.{k}" for k in keys])
    note = "" if slot == 0 else f", keyword {slot}"
    return (
        prefix,
        tail,
        names,
        signature_text("replay", model, cut, start.module, names, frozen_ran, note),
    )


def _is_hidden(x: Any, batch: int) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() >= 2
        and x.shape[0] == batch
    )


def _hidden_slot(args: tuple, kwargs: dict, batch: int) -> int | str | None:
    """Where the cut module takes the hidden states: ``0`` (its first positional input) or
    the keyword it gets them as (``hidden_states=`` when called so, as some Hugging Face
    models do; else the first float [batch, ...] keyword when nothing is positional)."""
    if args:
        return 0 if _is_hidden(args[0], batch) else None
    if _is_hidden(kwargs.get("hidden_states"), batch):
        return "hidden_states"
    return next((k for k, v in kwargs.items() if _is_hidden(v, batch)), None)


class _ReplayPrefix(HookPrefix):
    """The hook prefix's frozen run to the cut; returns the cut's hidden states followed by
    the model's tensor inputs (which the replaying tail needs)."""

    def __init__(
        self, model, cut, cut_name, frozen, status, keys: list[str] | None, slot: int | str = 0
    ):
        super().__init__(model, cut, cut_name, frozen, status)
        self.keys = keys
        self.slot = slot

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        inputs = (
            [x] if self.keys is None else [x[k] for k in self.keys]
        )  # before: the model may add to x
        args, kwargs = self.run_to_cut(x)
        return (args[0] if self.slot == 0 else kwargs[self.slot], *inputs)


class ReplayTail(nn.Module):
    """Replays the model's forward on cached taps, skipping the frozen modules below the cut."""

    def __init__(
        self,
        model: nn.Module,
        cut: nn.Module,
        skip: list[tuple[nn.Module, tuple | None]],
        keys: list[str] | None,
        slot: int | str = 0,
    ):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_cut", cut)  # already registered inside model
        object.__setattr__(self, "_skip", skip)
        self.keys = keys
        self.slot = slot

    def raw_inputs(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The model's input rebuilt from the cached input taps."""
        return inputs[0] if self.keys is None else dict(zip(self.keys, inputs))

    @contextlib.contextmanager
    def replaying(self, hidden: torch.Tensor) -> Iterator[None]:
        """While inside, a forward of the model skips the frozen modules below the cut and
        feeds ``hidden`` to the cut module (also used to compute a higher cut's cache from
        this cut's cache, see ``fastft._derive``)."""
        # Whatever reads the placeholder downstream is the cut module, whose input is replaced
        # below. It is a real tensor, not a zero-stride view: code between the skipped modules
        # and the cut may write to it in place (XLM's ``tensor *= mask``), which a view refuses.
        # Its bytes are those of the hidden states the cut receives anyway.
        placeholder = torch.zeros_like(hidden)

        def skipped(layout):
            out = (
                placeholder if layout is None else tuple(placeholder if t else None for t in layout)
            )
            return lambda *args, **kwargs: out

        def inject(module, args, kwargs):
            if self.slot == 0:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, self.slot: hidden}

        # An instance attribute shadows the class's forward. A module may already have one
        # (accelerate's hooks, a user's wrapper): it is put back afterwards, whatever happens.
        # While inside, every forward of these module objects is skipped, from any thread; the
        # lock makes replays of several threads (predict() served from threads) take turns,
        # else one could save another's placeholder forward as the one to put back.
        with _REPLAY_LOCK:
            saved = [(m, m.__dict__.get("forward", _NONE)) for m, _ in self._skip]
            handle = self._cut.register_forward_pre_hook(inject, with_kwargs=True)
            try:
                for m, layout in self._skip:
                    m.forward = skipped(layout)
                yield
            finally:
                handle.remove()
                for m, previous in saved:
                    if previous is _NONE:
                        m.__dict__.pop("forward", None)
                    else:
                        m.__dict__["forward"] = previous

    def forward(self, hidden: torch.Tensor, *inputs: torch.Tensor) -> Any:
        with self.replaying(hidden):
            return call_model(self.model, self.raw_inputs(inputs))
