"""Data in a form fastft does not take, refused with a :class:`~fastft.errors.DataError` that
names what was given and the line that turns it into a form fastft takes.

fastft takes tensors: ``(X, y)`` with ``X`` a tensor or a dict of tensors, a map-style
``Dataset`` of ``(input, label)`` items, or a ``DataLoader``. The usual near misses are
NumPy arrays (``torch.from_numpy``), a list of per-sample tensors (``torch.stack``), labels
as a Python list (``torch.tensor``), a dict ``{"x": X, "y": y}`` (pass ``(X, y)``), several
inputs as a tuple (pass a dict keyed by ``forward``'s parameter names), one sample where a
batch is expected (``x.unsqueeze(0)``) and a tensor for a ``forward`` that takes several.
The checks run only on data that is not already in an accepted form, so they cost nothing
on the normal path.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from fastft.errors import DataError

__all__ = [
    "check_data_form",
    "check_inputs_form",
    "input_ranks",
    "explained_predict",
    "check_forward_inputs",
]

MULTI_INPUT_HINT = (
    "For a model whose forward takes several tensors (forward(self, ids, mask)), pass one dict "
    "keyed by forward's parameter names: ({'ids': ids, 'mask': mask}, y); fastft calls "
    "forward(**inputs) (see fastft.model.calling)."
)


def _describe(obj: Any) -> str:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return f"{type(obj).__name__} {obj.dtype} {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)}"
    return type(obj).__name__


def _length(obj: Any) -> int | None:
    if isinstance(obj, (torch.Tensor, np.ndarray)) and obj.ndim:
        return int(obj.shape[0])
    return None


def _inputs_problem(X: Any, n: int | None, name: str) -> str | None:
    """What is wrong with inputs ``X`` (``n`` labels, when known), or None if nothing known."""
    if isinstance(X, np.ndarray):
        return f"{name} is a NumPy array ({_describe(X)}); use torch.from_numpy({name})."
    if isinstance(X, (list, tuple)) and X and all(isinstance(t, torch.Tensor) for t in X):
        lengths = {_length(t) for t in X}
        several = len(X) != n and lengths == {n} and n is not None
        if several:
            return f"{name} is a {type(X).__name__} of {len(X)} input tensors. " + MULTI_INPUT_HINT
        return (
            f"{name} is a {type(X).__name__} of {len(X)} tensors (one per sample?); stack them "
            f"into one tensor: torch.stack({name})."
        )
    if isinstance(X, (list, tuple)) and X and all(isinstance(t, np.ndarray) for t in X):
        return (
            f"{name} is a {type(X).__name__} of {len(X)} NumPy arrays; use "
            f"torch.from_numpy(np.stack({name}))."
        )
    if isinstance(X, (list, tuple)):
        return f"{name} is a Python {type(X).__name__}; use torch.tensor({name})."
    return None


def check_data_form(data: Any) -> None:
    """DataError for training/evaluation data in a near-miss form (see the module docstring);
    nothing for anything else (a Dataset is then read as usual)."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        X, y = data
        if isinstance(X, np.ndarray) and isinstance(y, np.ndarray):
            raise DataError(
                f"got a pair of NumPy arrays (X: {_describe(X)}, y: {_describe(y)}); fastft takes "
                "tensors: pass (torch.from_numpy(X), torch.from_numpy(y))."
            )
        if isinstance(y, (list, tuple)) and not all(
            isinstance(v, (int, float, np.number)) for v in y
        ):
            return  # not labels: a list of two samples, read as a Dataset
        if not isinstance(y, (torch.Tensor, np.ndarray, list, tuple)):
            return
        n = _length(y) if not isinstance(y, (list, tuple)) else len(y)
        problems = (
            [_inputs_problem(X, n, "X")] if not isinstance(X, (torch.Tensor, Mapping)) else []
        )
        if isinstance(y, np.ndarray):
            problems.append(f"y is a NumPy array ({_describe(y)}); use torch.from_numpy(y).")
        elif isinstance(y, (list, tuple)):
            problems.append(f"y is a Python {type(y).__name__}; use torch.tensor(y).")
        problems = [p for p in problems if p]
        if problems:
            raise DataError(
                "the data is an (X, y) pair, but fastft takes tensors: " + " ".join(problems)
            )
    if isinstance(data, Mapping) and 0 not in data:
        keys = ", ".join(repr(k) for k in list(data)[:6])
        if "train" in data:
            raise DataError(
                f"got a dict of splits (keys {keys}); pass one split: fit(data['train'], "
                "val=data['validation']), evaluate(data['test'])."
            )
        raise DataError(
            f"got a dict with keys {keys}; fastft takes training data as an (X, y) pair, e.g. "
            "(d['x'], d['y']), or a Dataset whose items are (input, label). A dict of tensors "
            "is the inputs X of such a pair: ({'input_ids': ..., 'attention_mask': ...}, y)."
        )
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise DataError(
            f"got one {_describe(data)} and no labels; pass (X, y): inputs and their labels."
        )


def check_inputs_form(x: Any) -> None:
    """DataError for ``predict`` inputs that are not a tensor or a dict of tensors but could be
    made one."""
    if isinstance(x, (torch.Tensor, Mapping)):
        return
    problem = _inputs_problem(x, None, "x")
    if problem:
        raise DataError(f"predict takes a tensor or a dict of tensors: {problem}")


def input_ranks(inputs: Any) -> dict[str, int] | None:
    """The number of dimensions of each tensor of a batch of inputs (key ``""`` for a lone
    tensor); None for anything else."""
    if isinstance(inputs, torch.Tensor):
        return {"": inputs.dim()}
    if isinstance(inputs, Mapping) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return {str(k): v.dim() for k, v in inputs.items()}
    return None


def _unbatched(x: Any, reference: dict[str, int] | None) -> str | None:
    """The fix for ``x`` when it has one dimension fewer than the batches the model was split
    on (``reference``), else None."""
    ranks = input_ranks(x)
    if not ranks or not reference or set(ranks) != set(reference):
        return None
    if all(ranks[k] == reference[k] - 1 for k in ranks):
        if set(ranks) == {""}:
            return (
                f"x has {ranks['']} dimensions, one fewer than the batches the model was "
                f"prepared on ({reference['']}): it looks like one sample. Add a batch "
                "dimension: predict(x.unsqueeze(0))."
            )
        return (
            "every tensor of x has one dimension fewer than in the batches the model was "
            "prepared on: it looks like one sample. Add a batch dimension: "
            "predict({k: v.unsqueeze(0) for k, v in x.items()})."
        )
    return None


@contextlib.contextmanager
def explained_predict(x: Any, reference: dict[str, int] | None) -> Iterator[None]:
    """Around ``predict``: refuse inputs of a wrong form up front, one unbatched sample (one
    dimension fewer than ``reference``, the ranks of the batches the model was split on) with
    the ``unsqueeze(0)`` to add; when the model fails on a tensor and no reference is known,
    the error gets a note saying so."""
    check_inputs_form(x)
    fix = _unbatched(x, reference)
    if fix:
        raise DataError(fix)
    try:
        yield
    except Exception as exc:
        if isinstance(x, torch.Tensor) and reference is None and not isinstance(exc, DataError):
            exc.add_note(
                "fastft: predict takes a batch; if x is one sample, add a batch dimension: "
                "predict(x.unsqueeze(0))."
            )
        raise


def _required_positional(model: torch.nn.Module) -> list[str] | None:
    """Names of ``model.forward``'s required positional parameters; None when unknown or when
    it takes ``*args``."""
    forward = model.__dict__.get("forward") or model.forward  # bound: no self
    try:
        params = list(
            inspect.signature(getattr(forward, "__wrapped__", forward)).parameters.values()
        )
    except (TypeError, ValueError):
        return None
    if params and params[0].name == "self":
        params = params[1:]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]


def check_forward_inputs(model: torch.nn.Module, inputs: Any) -> None:
    """DataError when ``model.forward`` needs several tensors and ``inputs`` cannot give them:
    a lone tensor, or a dict whose keys do not name forward's required parameters."""
    required = _required_positional(model)
    if not required or len(required) < 2:
        return
    signature = f"forward({', '.join(required)})"
    example = "{" + ", ".join(f"'{name}': {name}" for name in required) + "}"
    if isinstance(inputs, torch.Tensor):
        raise DataError(
            f"{type(model).__name__}.{signature} takes {len(required)} tensors, but the inputs "
            f"are one tensor. Pass the inputs as a dict keyed by those names: ({example}, y) "
            "for fit, predict(" + example + "); fastft calls forward(**inputs)."
        )
    if isinstance(inputs, Mapping):
        missing = [name for name in required if name not in inputs]
        if missing:
            raise DataError(
                f"{type(model).__name__}.{signature} needs {', '.join(missing)}, which the inputs "
                f"dict (keys {', '.join(repr(str(k)) for k in inputs)}) does not hold; name the "
                f"dict's keys after forward's parameters: {example}."
            )
