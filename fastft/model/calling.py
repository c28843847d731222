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
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.errors import DataError

__all__ = [
    "call_model",
    "dtype_mismatch",
    "logits_of",
    "structured_output",
    "takes_keywords",
]


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


#: What torch's errors say when an op gets tensors of two dtypes (matmul, conv, norms, ...).
_DTYPE_CLASH = re.compile(
    r"same dtype|scalar type|Input type .* should be the same|dtype .* but got|"
    r"expected .*dtype|should be the same",
    re.IGNORECASE,
)


def _float_dtypes(x: Any) -> set[torch.dtype]:
    if isinstance(x, torch.Tensor):
        return {x.dtype} if x.is_floating_point() else set()
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return set().union(*[_float_dtypes(v) for v in x]) if x else set()
    return set()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_mismatch(exc: BaseException, inputs: Any, model: nn.Module) -> DataError | None:
    """A :class:`~fastft.DataError` naming both dtypes when ``exc`` (or what caused it) is
    torch refusing to mix the dtype of floating-point ``inputs`` with the dtype of
    ``model``'s weights (``mat1 and mat2 must have the same dtype``); None otherwise."""
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    data = _float_dtypes(inputs)
    if model_dtype is None or not data or data == {model_dtype}:
        return None
    chain, link = [], exc
    while link is not None and len(chain) < 16:
        chain.append(link)
        link = link.__cause__ or link.__context__
    matching = [e for e in chain if _DTYPE_CLASH.search(str(e))]
    if not matching:
        return None
    cause = matching[-1]  # torch's own error, under any fastft error that wrapped it
    got = ", ".join(sorted(_dtype_name(d) for d in data - {model_dtype}))
    want = _dtype_name(model_dtype)
    first = got.split(", ")[0]
    cast = "model.float()" if first == "float32" else f"model.to(torch.{first})"
    return DataError(
        f"the inputs are {got} but the model's weights are {want} (torch: "
        f"{type(cause).__name__}: {str(cause).splitlines()[0]}). Give the data the model's "
        f"dtype (X.to(torch.{want}), or a transform/collate that does), or the model the "
        f"data's ({cast} before FineTuner)."
    )


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
