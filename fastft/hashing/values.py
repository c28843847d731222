"""How values are hashed: tensors, arrays, sequences, mappings, sets, builtin subclasses.

A mixin of :class:`~fastft.hashing.content.ContentHasher` (it walks values with the
hasher's ``_child`` and ``_emit``), and :func:`tensor_digest`, the digest of one tensor's
content that the hasher and the trainer's checkpoints use.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from typing import Any

import numpy as np
import torch

from fastft.hashing._common import PLAIN, Opaque

__all__ = ["ValueHashing", "tensor_digest"]


# ---------------------------------------------------------------------------- tensors
def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes (about 2 GB/s).

    Not memoised on purpose: a change made through ``tensor.data`` does not bump the
    version counter, so a memo could return the hash of old content.
    """
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.cpu().contiguous().view(torch.uint8).numpy()))
    return h.digest()


# ---------------------------------------------------------------------------- the mixin
class ValueHashing:
    """The values :class:`~fastft.hashing.content.ContentHasher` hashes by content."""

    def _tensor(self, t: torch.Tensor) -> None:
        if t.is_meta or t.device.type == "meta":
            raise Opaque("a meta tensor (no data)")
        if t.layout != torch.strided:
            if t.is_sparse:
                t = t.coalesce()
                self._emit("sparse", repr(tuple(t.shape)))
                self._tensor(t.indices())
                self._tensor(t.values())
                return
            raise Opaque(f"a tensor with layout {t.layout}")
        if t.is_quantized:
            self._emit("quantized", f"{t.qscheme()}")
            self._tensor(t.int_repr())
            self._child(
                t.q_per_channel_scales()
                if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
                else torch.tensor([t.q_scale(), t.q_zero_point()], dtype=torch.float64),
                "quantization",
            )
            return
        self._emit(
            "tensor",
            tensor_digest(t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t),
        )

    def _array(self, a: np.ndarray) -> None:
        if type(a) is not np.ndarray:  # a masked or matrix array: its class and extra state too
            self._child(type(a), "__class__")
            self._child(getattr(a, "__dict__", {}), "__dict__")
            if isinstance(a, np.ma.MaskedArray):
                self._child(np.ma.getmaskarray(a).copy(), "mask")
            a = np.asarray(a)
        if a.dtype.hasobject:
            self._emit("objarray", repr(a.shape))
            self._child(a.tolist(), "items")
            return
        self._emit("array", f"{a.dtype.descr}{a.shape}")  # descr: a structured dtype's fields too
        self._emit("bytes", np.ascontiguousarray(a).tobytes())

    def _sequence(self, seq) -> None:
        self._emit(type(seq).__name__, str(len(seq)))
        if len(seq) > 8 and all(
            type(item) in PLAIN for item in seq
        ):  # a vocabulary, a shape list: at once
            self._emit("plain", repr(list(seq)))
            return
        for i, item in enumerate(seq):
            self._child(item, f"[{i}]")

    def _builtin_subclass(self, obj: Any) -> None:
        """A namedtuple, a str subclass (torch's TorchVersion), a dict subclass: its class, its
        value as the builtin it extends, and any attributes of its own."""
        self._emit("subclass")
        self._child(type(obj), "__class__")
        # The builtin's own methods: a subclass's __int__ or __iter__ may say something else.
        value = (
            str.__str__(obj)
            if isinstance(obj, str)
            else bytes.__getitem__(obj, slice(None))
            if isinstance(obj, bytes)
            else int.__int__(obj)
            if isinstance(obj, int)
            else float.__float__(obj)
            if isinstance(obj, float)
            else dict(dict.items(obj))
            if isinstance(obj, dict)
            else list.__getitem__(obj, slice(None))
            if isinstance(obj, list)
            else frozenset(set.__iter__(obj))
            if isinstance(obj, set)
            else frozenset(frozenset.__iter__(obj))
            if isinstance(obj, frozenset)
            else list(deque.__iter__(obj))
            if isinstance(obj, deque)
            else tuple.__getitem__(obj, slice(None))
        )
        self._child(value, "value")
        self._child(dict(getattr(obj, "__dict__", {})), "__dict__")

    def _mapping(self, mapping: dict) -> None:
        self._emit(type(mapping).__name__, str(len(mapping)))
        if isinstance(mapping, defaultdict):
            self._child(mapping.default_factory, "default_factory")
        items = list(mapping.items())
        if len(items) > 8 and all(type(k) in PLAIN and type(v) in PLAIN for k, v in items):
            self._emit("plain", repr(items))  # a tokenizer's vocabulary: one update, not 60,000
            return
        for key, value in items:
            self._child(key, "key")
            self._child(value, f"[{key!r:.40}]")

    def _set(self, items) -> None:
        # Hash order of strings changes between processes: sort by each element's own digest.
        digests = []
        for item in items:
            sub = type(self)(
                weights=self._weights_mode if self._weights_mode != "apart" else "inline",
                eval_mode=self._eval_mode,
            )
            sub._masked, sub._depth, sub._path = self._masked, self._depth, list(self._path)
            sub.update(item, "element")
            self.opaque.extend(x for x in sub.opaque if x not in self.opaque)
            digests.append(sub.hexdigest())
        self._emit(type(items).__name__, ",".join(sorted(digests)))
