"""How a model is called on a batch, and where its logits are in what it returns.

The same two rules hold everywhere fastft runs a model (the split, the frozen prefix, a
replayed tail, ``predict``, probes):

- **Inputs.** A tensor is passed as the one argument. A dict of tensors (a tokenizer's
  ``BatchEncoding`` too) goes to ``forward`` as keyword arguments when ``forward`` names
  every key as a parameter (Hugging Face models: ``input_ids=``, ``attention_mask=``, ...),
  or names some of them and takes ``**kwargs`` for the rest; otherwise, as one argument
  (a SentenceTransformer's ``forward(input)``, a ``forward(batch)`` of one's own). A
  ``forward`` with exactly one parameter always gets the dict as that argument. A dict with
  keys ``forward`` does not take, while it names others, is refused with the keys to drop.
- **Outputs.** A model may return a tensor, a ``ModelOutput``, a dataclass or a dict with a
  ``logits`` entry, or a tuple (whose first item is the logits): :func:`logits_of` finds the
  tensor a loss is computed on.

Nothing here imports a model library: the rules read ``inspect.signature`` and duck types.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.errors import DataError

__all__ = ["call_model", "logits_of", "structured_output", "takes_keywords"]


@functools.lru_cache(maxsize=256)
def _parameters(fn: Any) -> tuple[tuple[str, ...], bool, int]:
    """(names a caller may pass by keyword, takes ``**kwargs``, number of parameters)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return (), True, 2  # unknown: not "one parameter"
    if params and params[0].name == "self" and not inspect.ismethod(fn):
        params = params[1:]
    named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named, any(p.kind == p.VAR_KEYWORD for p in params), len(params)


def _forward_of(model: nn.Module) -> Any:
    forward = model.__dict__.get("forward")  # an instance's own forward (accelerate's hooks)
    if forward is not None:
        return getattr(forward, "__wrapped__", forward)
    return type(model).forward


def takes_keywords(model: nn.Module, inputs: Any) -> bool:
    """Whether ``model`` is called with the dict ``inputs`` as keyword arguments (see the
    module docstring); False for anything that is not a dict."""
    if not isinstance(inputs, Mapping) or not inputs:
        return False
    try:
        named, var_kw, count = _parameters(_forward_of(model))
    except TypeError:  # an unhashable callable: look without the memo
        named, var_kw, count = _parameters.__wrapped__(_forward_of(model))
    if count == 1 and not var_kw:
        return False
    keys = [k for k in inputs if isinstance(k, str)]
    known = [k for k in keys if k in named]
    if not known:
        return False
    if len(known) == len(inputs) or var_kw:
        return True
    unknown = [repr(k) for k in inputs if k not in named]
    raise DataError(
        f"the inputs hold {', '.join(unknown)}, which {type(model).__name__}.forward() does not "
        f"take (it takes {', '.join(named)}); drop those keys from the inputs."
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` or ``model(inputs)``, by the rule of :func:`takes_keywords`."""
    if takes_keywords(model, inputs):
        return model(**inputs)
    return model(inputs)


def _field(out: Any, name: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(name)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return getattr(out, name, None)
    return None


def logits_of(out: Any) -> Any:
    """The logits in a model's output: the tensor itself, ``out.logits`` / ``out['logits']``
    of a ModelOutput, dataclass or dict, or the first item of a tuple. Anything else (a dict
    without ``logits``) is returned as is."""
    if isinstance(out, torch.Tensor):
        return out
    found = _field(out, "logits")
    if isinstance(found, torch.Tensor):
        return found
    if isinstance(out, (tuple, list)) and out and not isinstance(out, Mapping):
        first = out[0]
        return first if isinstance(first, torch.Tensor) else logits_of(first)
    return out


def structured_output(out: Any) -> bool:
    """True when ``out`` is not a tensor but holds logits :func:`logits_of` finds."""
    return not isinstance(out, torch.Tensor) and isinstance(logits_of(out), torch.Tensor)
