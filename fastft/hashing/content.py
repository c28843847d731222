"""Content hashes of Python objects for cache keys: what an object *computes with*, by value.

A cache is reused only when its key says that the features would be computed the same way
now. The key therefore hashes the objects that compute them (the frozen modules, the
transform, the collate function) by everything that determines what they compute:

- tensors and arrays by their full content (dtype, shape, bytes);
- ``nn.Module`` objects by their class, every attribute in ``__dict__`` (hyper-parameters,
  plain tensors, configs), forward hooks, parameters, buffers and submodules;
- functions by value: bytecode, constants, defaults, closure cells and the globals their
  code reads, followed through the attributes it reads of the user's modules (the rule
  cloudpickle uses to pickle a function by value, made exact by reading the bytecode);
  ``functools.partial`` by its function and arguments, bound methods by function and owner;
- classes defined by the user by value (every method and class attribute);
- other objects by their state (``__dict__``/``__slots__``, or what ``__reduce_ex__`` gives,
  as pickle and joblib do); sets in a canonical order (joblib's rule), dicts in order.

Library code (see :mod:`fastft.hashing.reads`) is hashed by qualified name and the installed
version of its package; a method of a library class replaced by the user is hashed by value.
Code of the user is hashed by value, without file names or line numbers, so that moving a
function or re-running a notebook cell does not change its hash.

What cannot be seen soundly is reported, not guessed: objects whose state cannot be read
(open files, sockets, generators, C objects without pickle support) and code that reads
the outside world (``open``, ``os``, ``np.load``, ``sys.modules``, ...). Such a hash is
*opaque*: :attr:`ContentHasher.opaque` says where and why, and the cache key built from it
is never reused unless the caller names the content with an explicit id.

joblib's ``hash`` and cloudpickle were the models, but neither fits as is: joblib pickles
functions and classes by reference (a changed function body keeps its hash), cloudpickle's
bytes include file names and line numbers (a notebook cell re-run changes them) and
neither reads tensors at hashing speed.

This module holds :class:`ContentHasher` itself (its state, its output, the dispatch from a
type to its handler); the handlers are mixins, one module per kind of value:
:mod:`~fastft.hashing.values` (tensors, arrays, containers), :mod:`~fastft.hashing.objects`
(modules and other objects) and :mod:`~fastft.hashing.code` (functions, classes, modules).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import logging
import re
import sys
import threading
import types
import weakref
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from fastft.hashing import reads
from fastft.hashing._common import BUILTIN_TYPES, Opaque, type_name
from fastft.hashing.code import CodeHashing
from fastft.hashing.objects import ObjectHashing
from fastft.hashing.values import ValueHashing

__all__ = ["ContentHasher", "content_hash", "first_difference"]


# ---------------------------------------------------------------------------- what is seen how
#: Objects that never determine what is computed (a lock, a logger, a weak cache): by type only.
_INERT = (
    type(threading.Lock()),
    type(threading.RLock()),
    threading.Condition,
    threading.Event,
    threading.Semaphore,
    logging.Logger,
    logging.Handler,
    logging.Formatter,
    logging.Filter,
    weakref.WeakKeyDictionary,
    weakref.WeakValueDictionary,
    weakref.WeakSet,
)
_SIMPLE = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    type(Ellipsis),
    type(NotImplemented),
    range,
    slice,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)
_OPAQUE_TYPES = (
    types.GeneratorType,
    types.CoroutineType,
    types.AsyncGeneratorType,
    types.FrameType,
    weakref.ProxyType,
    io.IOBase,
    memoryview,
)
_MAX_DEPTH = 200
_ADDRESS = re.compile(r"( at)? 0x[0-9a-fA-F]+")


# ---------------------------------------------------------------------------- the hasher
class ContentHasher(ValueHashing, ObjectHashing, CodeHashing):
    """Feeds objects into one sha256, by value (see the module docstring).

    ``mask_modules`` / ``mask_params``: modules and parameters (by identity) that are known not
    to take part in the computation being keyed (the trainable tail of a split model, which
    runs after the cut): they are hashed as a placeholder, so that training them does not
    change the key. ``weights``: what of registered parameters and buffers is hashed:
    ``"inline"`` their content, ``"apart"`` their content into a digest of their own
    (:meth:`weights_hexdigest`) and their names and shapes into the main one, ``"layout"``
    names and shapes only. ``eval_mode``: the modules hashed always run in eval mode (a frozen
    prefix), so their ``training`` flag does not count. ``trace``: see :attr:`trace`.
    """

    def __init__(
        self,
        *,
        mask_modules: Iterable[nn.Module] = (),
        mask_params: Iterable[torch.Tensor] = (),
        weights: str = "inline",
        eval_mode: bool = False,
        trace: bool = False,
    ):
        if weights not in ("inline", "apart", "layout"):
            raise ValueError(f"weights must be 'inline', 'apart' or 'layout', got {weights!r}")
        self._h = hashlib.sha256()
        #: With ``trace=True``: ``(path, running digest)`` after each attribute, parameter and
        #: buffer of every module, so that two hashes of the same object can say where they
        #: first differ (:func:`first_difference`).
        self.trace: list[tuple[str, bytes]] | None = [] if trace else None
        self._weights_mode = weights
        self._weights = hashlib.sha256() if weights == "apart" else None
        self._eval_mode = eval_mode
        self._memo: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps memoised temporaries alive, so ids are not reused
        self._masked = {id(m) for m in mask_modules} | {id(p) for p in mask_params}
        self._path: list[str] = []
        self._depth = 0
        self._class_ignore: list[set[str]] = []  # fastft_key_ignore of the classes being walked
        #: What could not be seen, as ``"where: why"`` (empty when the hash is sound).
        self.opaque: list[str] = []

    # ------------------------------------------------------------------ output
    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def weights_hexdigest(self) -> str:
        """Digest of the registered parameters and buffers (with ``weights="apart"``)."""
        if self._weights is None:
            raise ValueError("this ContentHasher does not hash weights apart (weights='apart')")
        return self._weights.hexdigest()

    def _emit(self, tag: str, payload: bytes | str = b"") -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self._h.update(f"{tag}:{len(data)}:".encode() + data)

    def _note_opaque(self, why: str) -> None:
        where = ".".join(self._path) or "the object"
        if len(self.opaque) < 8 and f"{where}: {why}" not in self.opaque:
            self.opaque.append(f"{where}: {why}")
        self._emit("opaque", _ADDRESS.sub("", why))  # what was not seen, stable across processes

    def _mark(self, name: str) -> None:
        if self.trace is not None:
            digest = self._h.copy()
            if self._weights is not None:
                digest.update(self._weights.digest())
            self.trace.append((".".join(self._path[1:] + [name]), digest.digest()))

    # ------------------------------------------------------------------ entry points
    def update(self, obj: Any, name: str = "") -> ContentHasher:
        """Hash ``obj`` (``name`` labels it in :attr:`opaque` messages)."""
        self._child(obj, name or type(obj).__name__)
        return self

    def _child(self, obj: Any, name: str) -> None:
        self._path.append(name)
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise Opaque(f"nested more than {_MAX_DEPTH} levels deep")
            self._walk(obj)
        except Opaque as exc:
            self._note_opaque(str(exc))
        except RecursionError:
            self._note_opaque("nested too deeply to read")
        except Exception as exc:  # an object that fails when read: it cannot be seen, never a crash
            self._note_opaque(
                f"a {type_name(obj)} that cannot be read ({type(exc).__name__}: {exc})"[:300]
            )
        finally:
            self._depth -= 1
            self._path.pop()

    # ------------------------------------------------------------------ dispatch
    def _walk(self, obj: Any) -> None:
        if isinstance(obj, _SIMPLE) and type(obj) in _SIMPLE:
            self._emit(type(obj).__name__, repr(obj))
            return
        if isinstance(obj, (bytes, bytearray)) and type(obj) in (bytes, bytearray):
            self._emit("bytes", bytes(obj))
            return
        if id(obj) in self._memo:  # shared or cyclic: a back-reference, in traversal order
            self._emit("ref", str(self._memo[id(obj)]))
            return
        self._memo[id(obj)] = len(self._memo)
        self._alive.append(obj)
        if id(obj) in self._masked:
            self._emit("masked")
            return
        handler = self._handler(obj)
        handler(obj)

    def _handler(self, obj: Any):  # noqa: C901 - one dispatch table, in the order types are tried
        if isinstance(obj, torch.Tensor):
            return self._tensor
        if isinstance(obj, np.ndarray):
            return self._array
        if isinstance(obj, np.generic):
            return lambda o: self._emit("np." + str(o.dtype), o.tobytes())
        if isinstance(obj, torch.Size):
            return lambda o: self._emit("Size", repr(tuple(o)))
        if _is_compiled(obj):  # torch.compile's wrapper: what it compiles
            return lambda o: (self._emit("compiled"), self._child(o._orig_mod, "_orig_mod"))
        if isinstance(obj, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            return self._script
        if isinstance(obj, nn.Module):
            return self._module
        if isinstance(obj, types.ModuleType):
            return self._module_value
        if isinstance(obj, types.FunctionType):
            return self._function
        if isinstance(obj, types.MethodType):
            return self._method
        if isinstance(obj, BUILTIN_TYPES):
            return self._builtin
        if isinstance(obj, types.CodeType):
            return self._code
        if isinstance(obj, type):
            return self._class
        if isinstance(obj, functools.partial):
            return self._partial
        if type(obj).__name__ == "_lru_cache_wrapper":  # @lru_cache / @cache: the function it wraps
            return lambda o: (
                self._emit("lru_cache", repr(o.cache_parameters())),
                self._child(o.__wrapped__, "fn"),
            )
        if isinstance(obj, (staticmethod, classmethod)):
            return lambda o: (self._emit(type(o).__name__), self._child(o.__func__, "__func__"))
        if isinstance(obj, property):
            return lambda o: (
                self._emit("property"),
                [self._child(getattr(o, p), p) for p in ("fget", "fset", "fdel")],
            )
        if isinstance(obj, enum.Enum):
            return lambda o: (
                self._emit("enum", repr(o.name) if o.name is not None else repr(o.value)),
                self._child(o.value, "value"),
                self._child(type(o), "__class__"),
            )
        if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return lambda o: self._emit("op", f"{o}@{reads.library_version('torch')}")
        if isinstance(obj, (torch.finfo, torch.iinfo)):
            return lambda o: self._emit("info", f"{type(o).__name__}({o.dtype})")
        if isinstance(obj, re.Pattern):
            return lambda o: self._emit("re", f"{o.flags}:{o.pattern!r}")
        if isinstance(obj, torch.Generator):
            return lambda o: (self._emit("generator", str(o.device)), self._tensor(o.get_state()))
        if isinstance(obj, weakref.ReferenceType):  # what it refers to (an RNN's flat weights)
            return lambda o: (self._emit("weakref"), self._child(o(), "referent"))
        if isinstance(obj, (list, tuple, deque)) and type(obj) in (list, tuple, deque):
            return self._sequence
        if isinstance(obj, dict) and type(obj) in (dict, OrderedDict, defaultdict):
            return self._mapping
        if isinstance(obj, types.MappingProxyType):
            return lambda o: self._mapping(dict(o))
        if isinstance(obj, (set, frozenset)) and type(obj) in (set, frozenset):
            return self._set
        if isinstance(obj, (str, bytes, int, float, tuple, list, dict, set, frozenset, deque)):
            return self._builtin_subclass  # a subclass of a builtin value
        if isinstance(obj, _INERT):
            return lambda o: self._emit("inert", type(o).__qualname__)
        if isinstance(obj, io.IOBase) and obj in (
            sys.stdout,
            sys.stderr,
            sys.__stdout__,
            sys.__stderr__,
        ):
            return lambda o: self._emit("stdio", str(o.fileno()) if not o.closed else "closed")
        if isinstance(obj, _OPAQUE_TYPES):
            raise Opaque(f"a {type_name(obj)}, whose content cannot be read")
        return self._object


def _is_compiled(obj: Any) -> bool:
    return type(obj).__name__ == "OptimizedModule" and hasattr(obj, "_orig_mod")


def content_hash(obj: Any, **kwargs) -> tuple[str, list[str]]:
    """``(hex digest, opaque)`` of ``obj``: see :class:`ContentHasher` (its arguments)."""
    hasher = ContentHasher(**kwargs).update(obj)
    return hasher.hexdigest(), hasher.opaque


def first_difference(a: list[tuple[str, bytes]], b: list[tuple[str, bytes]]) -> str | None:
    """The first module attribute (path) at which two traces of the same object differ."""
    for (path_a, digest_a), (path_b, digest_b) in zip(a, b):
        if path_a != path_b or digest_a != digest_b:
            return path_a
    return None if len(a) == len(b) else (a[len(b)][0] if len(a) > len(b) else b[len(a)][0])
