"""The replay split, for models torch.fx cannot trace whose trainable modules do not run last
as a chain: typically a Hugging Face encoder with its top layers unfrozen, where the frozen
pooler, the pooling and the normalisation run after them and the layers take masks built by
code that is not a module.

The cut is the input of the first trainable module in execution order, as in the hook split.
The prefix runs the model up to the cut and returns two kinds of taps: the cut module's first
positional input (the hidden states, the expensive part) and the model's own tensor inputs
(token ids, attention mask: a few numbers per position).

The tail *replays* the model's forward on the cached inputs: the frozen modules that ran
before the cut are skipped (each returns a zero-stride placeholder of its recorded output's
shape instead of computing), and the cut module receives the cached hidden states. Code
outside modules (mask preparation, pooling arithmetic) and frozen modules after the cut (a
pooler) run as usual: they are cheap next to the skipped layers. Only modules whose output
has the shape of the hidden states are skipped; anything else (rotary tables, say) is
recomputed. Code that reads a skipped module's output other than through the cut (a branch
on the embeddings' values, say) would see zeros: the parity check on the example batch,
which must reproduce the model within ``atol``, is what rules that out.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from fastft._modules import FROZEN
from fastft._split_fx import CannotSplit, _batch_size
from fastft._split_hook import _HookPrefix, _outermost, _record_calls, _units


def _skippable(output: Any, shape: torch.Size) -> bool:
    """Whether a module's output is the hidden-states stream (or a tuple of it and Nones)."""
    if isinstance(output, torch.Tensor):
        return output.shape == shape
    if isinstance(output, (tuple, list)) and output:
        return isinstance(output[0], torch.Tensor) and all(
            o is None or (isinstance(o, torch.Tensor) and o.shape == shape) for o in output)
    return False


def _layout(output: Any) -> tuple[bool, ...] | None:
    """None for a tensor output; for a tuple, which of its items are tensors (else None)."""
    return None if isinstance(output, torch.Tensor) else tuple(isinstance(o, torch.Tensor) for o in output)


def _input_keys(example: Any) -> list[str] | None:
    """Keys of the batch-major tensors of a dict input (None: the input is one tensor)."""
    if isinstance(example, torch.Tensor):
        return None
    batch = _batch_size(example)
    return [k for k, v in example.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch]


def build(model: nn.Module, example: Any, status: dict[int, str]):
    """Return ``(prefix body, tail body, tap names, signature text)``."""
    if not isinstance(example, (torch.Tensor, Mapping)):
        raise CannotSplit("the model input is neither a tensor nor a dict of tensors")
    keys = _input_keys(example)  # before the forward: some encoders add their outputs to the dict
    units = _units(model, status)
    calls = _record_calls(model, example if keys is None else dict(example))
    start = next((c for c in calls if id(c.module) in units), None)
    if start is None:
        raise CannotSplit("no trainable module runs on the example inputs")
    if start.index == 0:
        raise CannotSplit("the model's own forward uses trainable parameters: nothing frozen runs before them")
    if sum(c.module is start.module for c in calls) != 1:
        raise CannotSplit(f"the first trainable module {start.name!r} runs more than once")
    main = start.args[0] if start.args else None
    batch = _batch_size(example)
    if not isinstance(main, torch.Tensor) or not main.is_floating_point() or main.dim() < 2 or main.shape[0] != batch:
        raise CannotSplit(f"the first positional input of {start.name!r} is not a float [batch={batch}, ...] tensor")

    frozen_ran = _outermost([c.name for c in calls[1:start.index] if status.get(id(c.module)) == FROZEN])
    by_name = {}
    for c in calls:
        by_name.setdefault(c.name, []).append(c)
    skip = [(model.get_submodule(n), _layout(by_name[n][0].output)) for n in frozen_ran
            if len(by_name[n]) == 1 and _skippable(by_name[n][0].output, main.shape)]
    if not skip:
        raise CannotSplit(f"no frozen module before {start.name!r} produces its input, so there is nothing to skip")
    cut = start.name
    prefix = _ReplayPrefix(model, start.module, cut, frozen_ran, status, keys)
    tail = _ReplayTail(model, start.module, skip, keys)
    names = [f"{cut}.input"] + (["input"] if keys is None else [f"input.{k}" for k in keys])
    lines = [
        "method: replay",
        f"model: {type(model).__module__}.{type(model).__qualname__}",
        f"cut: input of {cut} ({type(start.module).__qualname__})",
        f"taps: {names}",
    ] + [f"{n} = {model.get_submodule(n)!r}" for n in frozen_ran]
    return prefix, tail, names, "\n".join(lines)


class _ReplayPrefix(_HookPrefix):
    """The hook prefix's frozen run to the cut; returns the cut's hidden states followed by
    the model's tensor inputs (which the replaying tail needs)."""

    def __init__(self, model, cut, cut_name, frozen, status, keys: list[str] | None):
        super().__init__(model, cut, cut_name, frozen, status)
        self.keys = keys

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        hidden = super().forward(x)[0]
        inputs = [x] if self.keys is None else [x[k] for k in self.keys]
        return (hidden, *inputs)


class _ReplayTail(nn.Module):
    """Replays the model's forward on cached taps, skipping the frozen modules below the cut."""

    def __init__(self, model: nn.Module, cut: nn.Module, skip: list[tuple[nn.Module, tuple | None]],
                 keys: list[str] | None):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_cut", cut)  # already registered inside model
        object.__setattr__(self, "_skip", skip)
        self.keys = keys

    def raw_inputs(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The model's input rebuilt from the cached input taps."""
        return inputs[0] if self.keys is None else dict(zip(self.keys, inputs))

    @contextlib.contextmanager
    def replaying(self, hidden: torch.Tensor) -> Iterator[None]:
        """While inside, a forward of the model skips the frozen modules below the cut and
        feeds ``hidden`` to the cut module (also used to compute a higher cut's cache from
        this cut's cache, see ``fastft._derive``)."""
        # A zero-stride placeholder costs no memory or time; whatever reads it downstream is
        # the cut module, whose input is replaced below.
        placeholder = hidden.new_zeros(()).expand(hidden.shape)

        def skipped(layout):
            out = placeholder if layout is None else tuple(placeholder if t else None for t in layout)
            return lambda *args, **kwargs: out

        def inject(module, args, kwargs):
            return (hidden, *args[1:]), kwargs

        handle = self._cut.register_forward_pre_hook(inject, with_kwargs=True)
        for m, layout in self._skip:
            m.forward = skipped(layout)  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            handle.remove()
            for m, _ in self._skip:
                m.__dict__.pop("forward", None)

    def forward(self, hidden: torch.Tensor, *inputs: torch.Tensor) -> Any:
        with self.replaying(hidden):
            return self.model(self.raw_inputs(inputs))
