"""The content address of a feature cache.

A cache is identified by a hash of everything that determines its bytes: the frozen prefix
(structure and cut, parameters and buffers by content), the dataset (``dataset_id`` or its
length and a content hash of its samples), the transform and view settings, pooling, the
storage dtype and the format version. Each part is hashed on its own and kept in the
manifest, so that when a key changes fastft can say *which* part changed.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from typing import Any, Callable

import torch
from torch import nn

from fastft import data as fdata

#: Bump when the on-disk layout or the meaning of stored bytes changes.
FORMAT_VERSION = 1

#: The parts of a fingerprint, in the order they are reported when they change.
PARTS = ("format", "structure", "weights", "dataset", "transform", "views", "dtype", "pool")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()


def structure_key(prefix: nn.Module) -> str:
    """The prefix's graph, structure and cut: its ``signature()`` when it has one, else the
    repr of its module tree (layer types and hyper-parameters)."""
    signature = getattr(prefix, "signature", None)
    text = str(signature()) if callable(signature) else f"{type(prefix).__qualname__}\n{prefix!r}"
    return _sha(_ADDRESS.sub("", text))


def weights_key(prefix: nn.Module) -> str:
    """Hash of every parameter and buffer by name and content."""
    h = hashlib.sha256()
    # named_buffers also covers non-persistent buffers, which state_dict() leaves out.
    for name, tensor in [*prefix.named_parameters(), *prefix.named_buffers()]:
        h.update(name.encode() + fdata.tensor_digest(tensor))
    return h.hexdigest()


def callable_key(fn: Callable | None) -> str:
    """A stable description of a transform: its repr when that is meaningful (torchvision
    transforms list their parameters), else the function's name, code and closure, so that
    the key survives a new process (a bare repr holds a memory address) yet changes with
    the code."""
    if fn is None:
        return "none"
    code = getattr(fn, "__code__", None)
    if code is not None:  # a Python function or lambda
        closure = [c.cell_contents for c in (fn.__closure__ or ()) if _has_contents(c)]
        parts = [fn.__module__ or "", fn.__qualname__, code.co_code.hex(), repr(code.co_consts),
                 repr(code.co_names), _ADDRESS.sub("", repr(closure)), repr(fn.__defaults__)]
        return _sha("|".join(parts))
    text = repr(fn)
    if _ADDRESS.search(text):  # the default object repr: use its class and its state instead
        state = getattr(fn, "__dict__", {})
        text = f"{type(fn).__module__}.{type(fn).__qualname__}:{_ADDRESS.sub('', repr(sorted(state.items(), key=str)))}"
        call = getattr(type(fn), "__call__", None)
        if call is not None and hasattr(call, "__code__"):
            text += call.__code__.co_code.hex()
    return _sha(text)


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def accepts_generator(fn: Callable) -> bool:
    """True when ``fn`` takes a ``generator=`` keyword (then it gets the per-chunk generator)."""
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def fingerprint_parts(
    prefix: nn.Module,
    dataset: Any,
    *,
    dataset_id: str | None,
    transform: Callable | None,
    views: int,
    seed: int,
    dtype: str,
    pool: str,
    mask_key: str,
    amp: str | None = None,
) -> dict[str, str]:
    """The hash of each part of the key (see :data:`PARTS`). A prefix run under autocast
    gives other bytes: ``amp`` goes into the dtype part (absent without it, so the keys of
    ordinary caches do not change)."""
    n = fdata.dataset_length(dataset)
    dataset_part = f"id:{dataset_id}" if dataset_id is not None else f"n={n}:{fdata.sample_hash(dataset)}"
    # The seed only matters when there is a (random) transform: it is part of the transform.
    transform_part = callable_key(transform) + (f",seed={seed}" if transform is not None else "")
    return {
        "format": str(FORMAT_VERSION),
        "structure": structure_key(prefix),
        "weights": weights_key(prefix),
        "dataset": _sha(dataset_part),
        "transform": transform_part,
        "views": f"views={views}",
        "dtype": dtype + (f",prefix under {amp} autocast" if amp else ""),
        "pool": pool + (f":{mask_key}" if pool == "masked_mean" else ""),
    }


def combine(parts: dict[str, str]) -> str:
    """The fingerprint (40 hex characters) of a set of parts."""
    return _sha("\n".join(f"{k}={parts[k]}" for k in PARTS))[:40]


def changed_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Names of the parts that differ between two keys, in :data:`PARTS` order."""
    return [k for k in PARTS if old.get(k) != new.get(k)]
