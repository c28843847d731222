"""Content hashes of Python objects for cache keys: what an object *computes with*, by value.

A cache is reused only when its key says that the features would be computed the same way
now. The key therefore hashes the objects that compute them (the frozen modules, the
transform, the collate function) by everything that determines what they compute:

- tensors and arrays by their full content (dtype, shape, bytes);
- ``nn.Module`` objects by their class, every attribute in ``__dict__`` (hyper-parameters,
  plain tensors, configs), forward hooks, parameters, buffers and submodules;
- functions by value: bytecode, constants, defaults, closure cells and the globals their
  code reads (the rule cloudpickle uses to pickle a function by value), recursively;
  ``functools.partial`` by its function and arguments, bound methods by function and owner;
- classes defined by the user by value (every method and class attribute);
- other objects by their state (``__dict__``/``__slots__``, or what ``__reduce_ex__`` gives,
  as pickle and joblib do); sets in a canonical order (joblib's rule), dicts in order.

Library code (torch, numpy, torchvision, transformers, the standard library, fastft
itself; anything installed and not editable) is hashed by qualified name and the installed
version of its package: its source is what that version ships. Code of the user (scripts,
notebooks, editable installs, modules on ``sys.path``) is hashed by value, without file
names or line numbers, so that moving a function or re-running a notebook cell does not
change its hash.

What cannot be seen soundly is reported, not guessed: objects whose state cannot be read
(open files, sockets, generators, C objects without pickle support) and code that reads
the outside world directly (``open``, ``os``, ``time``, ``socket``, ...). Such a hash is
*opaque*: :attr:`ContentHasher.opaque` says where and why, and the cache key built from it
is never reused unless the caller names the content with an explicit id.

joblib's ``hash`` and cloudpickle were the models, but neither fits as is: joblib pickles
functions and classes by reference (a changed function body keeps its hash), cloudpickle's
bytes include file names and line numbers (a notebook cell re-run changes them) and
neither reads tensors at hashing speed.
"""

from __future__ import annotations

import builtins
import dataclasses
import dis
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
from importlib import metadata
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["ContentHasher", "content_hash", "tensor_digest", "is_library_module", "first_difference", "KEY_IGNORE"]

#: A class or instance attribute of an ``nn.Module``: names of its attributes that do not
#: change what it computes (a call counter, outputs kept for display), left out of its hash.
KEY_IGNORE = "fastft_key_ignore"

# ---------------------------------------------------------------------------- tensors
def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes (about 2 GB/s).

    Not memoised on purpose: a change made through ``tensor.data`` does not bump the
    version counter, so a memo could return the hash of old content.
    """
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.cpu().contiguous().view(torch.uint8).numpy()))
    return h.digest()


# ---------------------------------------------------------------------------- library or user code
#: Names that read the outside world (files, the clock, the environment, other processes):
#: code that refers to them directly computes with something no hash of the objects sees.
IMPURE_BUILTINS = frozenset({"open", "input", "exec", "eval", "compile", "__import__", "breakpoint"})
IMPURE_MODULES = frozenset({
    "os", "io", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "socket", "ssl", "select", "urllib", "http",
    "requests", "subprocess", "time", "datetime", "uuid", "secrets", "sqlite3", "mmap", "fcntl", "signal",
    "multiprocessing", "h5py", "zarr", "lmdb", "webdataset",
})
#: Packages whose code and objects are library code even when installed in editable mode.
ALWAYS_LIBRARY = frozenset({"fastft", "torch", "numpy", "builtins"})


@functools.lru_cache(maxsize=None)
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@functools.lru_cache(maxsize=None)
def _package_version(top: str) -> str | None:
    """``dist==version`` of the installed, non-editable distribution providing package
    ``top``; None when there is none (user code)."""
    if top in ALWAYS_LIBRARY:
        mod = sys.modules.get(top)
        return f"{top}=={getattr(mod, '__version__', '?')}"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return f"python=={sys.version.split()[0]}"
    for dist_name in _distributions().get(top, []):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        direct = dist.read_text("direct_url.json") or ""
        if '"editable": true' in direct.replace(" ", "").replace('"editable":true', '"editable": true'):
            return None  # the user's own package, installed to be edited: hashed by value
        return f"{dist_name}=={dist.version}"
    return None


def _top(module_name: str | None) -> str:
    return (module_name or "").partition(".")[0]


def is_library_module(module_name: str | None) -> bool:
    """True for the standard library and installed, non-editable packages (and fastft,
    torch, numpy), whose code is identified by name and version."""
    return bool(module_name) and _package_version(_top(module_name)) is not None


# ---------------------------------------------------------------------------- the hasher
#: nn.Module bookkeeping that does not change what ``forward`` computes.
_MODULE_SKIP = frozenset({
    "training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_hooks",
    "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_forward_hooks", "_forward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_compiled_call_impl", "_version",
})
#: torch.fx.GraphModule internals: its generated code stands for the graph.
_GRAPH_MODULE_SKIP = frozenset({
    "_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls", "_tracer_extras", "meta",
    "shape_env", "_create_node_hooks", "_deepcopy_hooks", "_erase_node_hooks", "_replace_hooks",
})
#: Class attributes that are not behaviour.
_CLASS_SKIP = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                         "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
                         "_abc_impl", "__slots__", "__slotnames__", "__annotate_func__", "__annotations_cache__",
                         # display only: never part of what an object computes
                         "__repr__", "__str__", "__format__", "__dir__", "__sizeof__", "__del__", "extra_repr"})
#: Objects that never determine what is computed (a lock, a logger): hashed by type only.
#: Methods that build or save an object and do not run when it computes: what they read (a
#: vocabulary file opened in __init__) ends up in the object's state, which is hashed itself,
#: so reading files there does not make the hash opaque. Their code is still hashed.
_SETUP_METHODS = frozenset({"__init__", "__new__", "__init_subclass__", "__post_init__", "__setstate__",
                            "__getstate__", "__reduce__", "__reduce_ex__", "__deepcopy__", "__copy__",
                            "reset_parameters", "init_weights", "_init_weights", "load_state_dict",
                            "_load_from_state_dict", "state_dict", "save", "load", "from_pretrained",
                            "save_pretrained"})
_INERT = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event,
          threading.Semaphore, logging.Logger, logging.Handler, logging.Formatter, logging.Filter)
_CODE_FIELDS = ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags", "co_code", "co_names",
                "co_varnames", "co_freevars", "co_cellvars", "co_exceptiontable")
_SIMPLE = (type(None), bool, int, float, complex, str, type(Ellipsis), type(NotImplemented), range, slice,
           torch.dtype, torch.device, torch.layout, torch.memory_format)
#: Values whose repr is their content (the same in every process): hashed in bulk in containers.
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
_OPAQUE_TYPES = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType, types.FrameType,
                 weakref.ReferenceType, weakref.ProxyType, io.IOBase, memoryview)
_MAX_DEPTH = 200
_ADDRESS = re.compile(r"( at)? 0x[0-9a-fA-F]+")


class _Opaque(Exception):
    """Internal: this object's content cannot be seen."""


class ContentHasher:
    """Feeds objects into one sha256, by value (see the module docstring).

    ``mask_modules`` / ``mask_params``: modules and parameters (by identity) that are known not
    to take part in the computation being keyed (the trainable tail of a split model, which
    runs after the cut): they are hashed as a placeholder, so that training them does not
    change the key. ``weights_apart``: the content of registered parameters and buffers goes
    into a digest of its own (:meth:`weights_hexdigest`), their names and shapes into the main
    one, so that a key can say whether weights or something else changed.
    """

    def __init__(self, *, mask_modules: Iterable[nn.Module] = (), mask_params: Iterable[torch.Tensor] = (),
                 weights_apart: bool = False, trace: bool = False):
        self._h = hashlib.sha256()
        #: With ``trace=True``: ``(path, running digest)`` after each attribute, parameter and
        #: buffer of every module, so that two hashes of the same object can say where they
        #: first differ (:func:`first_difference`).
        self.trace: list[tuple[str, bytes]] | None = [] if trace else None
        self._weights = hashlib.sha256() if weights_apart else None
        self._memo: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps memoised temporaries alive, so ids are not reused
        self._masked = {id(m) for m in mask_modules} | {id(p) for p in mask_params}
        self._path: list[str] = []
        self._depth = 0
        self._setup = 0  # > 0 inside a setup method (see _SETUP_METHODS)
        #: What could not be seen, as ``"where: why"`` (empty when the hash is sound).
        self.opaque: list[str] = []

    # ------------------------------------------------------------------ output
    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def weights_hexdigest(self) -> str:
        """Digest of the registered parameters and buffers (with ``weights_apart=True``)."""
        if self._weights is None:
            raise ValueError("this ContentHasher hashes weights inline (weights_apart=False)")
        return self._weights.hexdigest()

    def _emit(self, tag: str, payload: bytes | str = b"") -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self._h.update(f"{tag}:{len(data)}:".encode() + data)

    def _note_opaque(self, why: str) -> None:
        where = ".".join(self._path) or "the object"
        if len(self.opaque) < 8 and f"{where}: {why}" not in self.opaque:
            self.opaque.append(f"{where}: {why}")
        self._emit("opaque", _ADDRESS.sub("", why))  # what was not seen, stable across processes

    # ------------------------------------------------------------------ entry points
    def update(self, obj: Any, name: str = "") -> "ContentHasher":
        """Hash ``obj`` (``name`` labels it in :attr:`opaque` messages)."""
        self._child(obj, name or type(obj).__name__)
        return self

    def _child(self, obj: Any, name: str) -> None:
        self._path.append(name)
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise _Opaque(f"nested more than {_MAX_DEPTH} levels deep")
            self._walk(obj)
        except _Opaque as exc:
            self._note_opaque(str(exc))
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
        if isinstance(obj, torch.Tensor):
            self._tensor(obj)
        elif isinstance(obj, np.ndarray):
            self._array(obj)
        elif isinstance(obj, np.generic):
            self._emit("np." + obj.dtype.str, obj.tobytes())
        elif isinstance(obj, torch.Size):
            self._emit("Size", repr(tuple(obj)))
        elif isinstance(obj, nn.Module):
            self._module(obj)
        elif isinstance(obj, types.ModuleType):
            self._module_object(obj)
        elif isinstance(obj, types.FunctionType):
            self._function(obj)
        elif isinstance(obj, types.MethodType):
            self._emit("method", obj.__func__.__name__)
            self._child(obj.__func__, "__func__")
            self._child(obj.__self__, "__self__")
        elif isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                              types.MethodWrapperType, types.MethodDescriptorType, types.ClassMethodDescriptorType,
                              types.GetSetDescriptorType, types.MemberDescriptorType, np.ufunc)):
            self._builtin(obj)
        elif isinstance(obj, types.CodeType):
            self._code(obj)
        elif isinstance(obj, type):
            self._class(obj)
        elif isinstance(obj, functools.partial):
            self._emit("partial", type(obj).__qualname__)
            self._child(obj.func, "func")
            self._child(obj.args, "args")
            self._child(obj.keywords, "keywords")
            self._child(getattr(obj, "__dict__", {}), "__dict__")
        elif isinstance(obj, (staticmethod, classmethod)):
            self._emit(type(obj).__name__)
            self._child(obj.__func__, "__func__")
        elif isinstance(obj, property):
            self._emit("property")
            for part in ("fget", "fset", "fdel"):
                self._child(getattr(obj, part), part)
        elif isinstance(obj, enum.Enum):
            self._emit("enum", obj.name)
            self._child(type(obj), "__class__")
        elif isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            self._emit("op", f"{obj}@{_package_version('torch')}")
        elif isinstance(obj, torch.Generator):
            self._emit("generator", str(obj.device))
            self._tensor(obj.get_state())
        elif isinstance(obj, (list, tuple, deque)) and type(obj) in (list, tuple, deque):
            self._sequence(obj)
        elif isinstance(obj, dict) and type(obj) in (dict, OrderedDict, defaultdict):
            self._mapping(obj)
        elif isinstance(obj, types.MappingProxyType):
            self._mapping(dict(obj))
        elif isinstance(obj, (set, frozenset)) and type(obj) in (set, frozenset):
            self._set(obj)
        elif isinstance(obj, (str, bytes, int, float, tuple, list, dict)):  # a subclass of a builtin value
            self._builtin_subclass(obj)
        elif isinstance(obj, _INERT):
            self._emit("inert", type(obj).__qualname__)
        elif isinstance(obj, io.IOBase) and obj in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            self._emit("stdio", str(obj.fileno()) if not obj.closed else "closed")
        elif isinstance(obj, _OPAQUE_TYPES):
            raise _Opaque(f"a {_type_name(obj)}, whose content cannot be read")
        else:
            self._object(obj)

    # ------------------------------------------------------------------ values
    def _tensor(self, t: torch.Tensor) -> None:
        if t.is_meta or t.device.type == "meta":
            raise _Opaque("a meta tensor (no data)")
        if t.layout != torch.strided:
            if t.is_sparse:
                t = t.coalesce()
                self._emit("sparse", repr(tuple(t.shape)))
                self._tensor(t.indices())
                self._tensor(t.values())
                return
            raise _Opaque(f"a tensor with layout {t.layout}")
        if t.is_quantized:
            raise _Opaque("a quantized tensor")
        self._emit("tensor", tensor_digest(t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t))

    def _array(self, a: np.ndarray) -> None:
        if a.dtype.hasobject:
            self._emit("objarray", repr(a.shape))
            self._child(a.tolist(), "items")
            return
        self._emit("array", f"{a.dtype.str}{a.shape}")
        self._emit("bytes", np.ascontiguousarray(a).tobytes())

    def _sequence(self, seq) -> None:
        self._emit(type(seq).__name__, str(len(seq)))
        if len(seq) > 8 and all(type(item) in _PLAIN for item in seq):  # a vocabulary, a shape list: at once
            self._emit("plain", repr(list(seq)))
            return
        for i, item in enumerate(seq):
            self._child(item, f"[{i}]")

    def _builtin_subclass(self, obj: Any) -> None:
        """A namedtuple, a str subclass (torch's TorchVersion), a dict subclass: its class, its
        value as the builtin it extends, and any attributes of its own."""
        self._emit("subclass")
        self._child(type(obj), "__class__")
        base = next(b for b in (str, bytes, int, float, tuple, list, dict) if isinstance(obj, b))
        self._child(base(obj) if base is not dict else dict(obj.items()), "value")
        self._child(getattr(obj, "__dict__", {}), "__dict__")

    def _mapping(self, mapping: dict) -> None:
        self._emit(type(mapping).__name__, str(len(mapping)))
        if isinstance(mapping, defaultdict):
            self._child(mapping.default_factory, "default_factory")
        items = list(mapping.items())
        if len(items) > 8 and all(type(k) in _PLAIN and type(v) in _PLAIN for k, v in items):
            self._emit("plain", repr(items))  # a tokenizer's vocabulary: one update, not 60,000
            return
        for key, value in items:
            self._child(key, "key")
            self._child(value, f"[{key!r:.40}]")

    def _set(self, items) -> None:
        # Hash order of strings changes between processes: sort by each element's own digest.
        digests = []
        for item in items:
            sub = ContentHasher()
            sub._masked = self._masked
            sub.update(item, "element")
            self.opaque.extend(x for x in sub.opaque if x not in self.opaque)
            digests.append(sub.hexdigest())
        self._emit(type(items).__name__, ",".join(sorted(digests)))

    # ------------------------------------------------------------------ code
    def _code(self, code: types.CodeType) -> None:
        # No file name, line numbers or position tables: moving code does not change it.
        self._emit("code", code.co_name)
        for field in _CODE_FIELDS:
            value = getattr(code, field, None)
            if field == "co_flags":  # without the __future__ flags, which only change how it was compiled
                value &= 0xFFFF
            if value is not None:
                self._emit(field, value if isinstance(value, bytes) else repr(value))
        self._emit("consts", str(len(code.co_consts)))
        for i, const in enumerate(code.co_consts):
            if isinstance(const, frozenset):
                self._emit("frozenset", repr(sorted(map(repr, const))))
            else:
                self._child(const, f"co_consts[{i}]")

    def _function(self, fn: types.FunctionType) -> None:
        module = getattr(fn, "__module__", None)
        if is_library_module(module) and module != "builtins":  # exec'd code claims builtins
            # The library's code by name and version; what a library closure or default was
            # given (a factory's arguments) by value.
            self._emit("libfn", f"{module}.{fn.__qualname__}@{_package_version(_top(module))}")
            if fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__:
                self._child(fn.__defaults__, "__defaults__")
                self._child(fn.__kwdefaults__, "__kwdefaults__")
                self._child(_cell_values(fn), "__closure__")
            return
        # The user's code by value, not by where it lives: the same function run as a script
        # (__main__) or imported has the same hash.
        self._emit("fn", fn.__qualname__)
        self._code(fn.__code__)
        self._child(fn.__defaults__, "__defaults__")
        self._child(fn.__kwdefaults__, "__kwdefaults__")
        self._child(_cell_values(fn), "__closure__")
        self._globals(fn)
        extra = {k: v for k, v in vars(fn).items() if k not in ("__wrapped__",)} if hasattr(fn, "__dict__") else {}
        if "__wrapped__" in getattr(fn, "__dict__", {}):
            extra["__wrapped__"] = fn.__wrapped__
        self._child(extra, "__dict__")

    def _globals(self, fn: types.FunctionType) -> None:
        """The globals and builtins ``fn``'s code reads: cloudpickle's rule, made exact by
        reading the bytecode (names loaded as globals, nested code objects included; an
        attribute ``self.x`` is not the global ``x``)."""
        for module in sorted(_imports(fn.__code__)):  # `import os` inside the function
            if _top(module) in IMPURE_MODULES and not self._setup:
                self._path.append(module)
                self._note_opaque(f"the code imports the module {module} (files, clock or processes)")
                self._path.pop()
        attributes = sorted(_code_names(fn.__code__))
        names = sorted(_global_names(fn.__code__))
        scope = fn.__globals__
        builtin_names = scope.get("__builtins__", builtins)
        builtin_names = builtin_names if isinstance(builtin_names, dict) else vars(builtin_names)
        for name in names:
            if name in scope:
                value = scope[name]
                if isinstance(value, types.ModuleType):
                    self._module_reference(value, name, attributes)
                else:
                    self._emit("global", name)
                    self._child(value, name)
            elif name in builtin_names:
                if name in IMPURE_BUILTINS and not self._setup:
                    self._path.append(name)
                    self._note_opaque(f"the code calls the builtin {name}() (reads outside state)")
                    self._path.pop()
                else:
                    self._emit("builtin", name)

    def _module_reference(self, mod: types.ModuleType, name: str, names: list[str]) -> None:
        """A module the code refers to: by name for library modules (refusing those that read
        the outside world); for the user's own modules, the attributes the code may read."""
        mod_name = getattr(mod, "__name__", name)
        if (_top(mod_name) in IMPURE_MODULES or mod_name in IMPURE_MODULES) and not self._setup:
            self._path.append(name)
            self._note_opaque(f"the code uses the module {mod_name} (files, clock or processes)")
            self._path.pop()
            return
        self._emit("globalmodule", f"{name}={mod_name}")
        if is_library_module(mod_name):
            self._emit("version", _package_version(_top(mod_name)) or "")
            return
        for attr in names:
            if attr in vars(mod) and not isinstance(vars(mod)[attr], types.ModuleType):
                self._emit("attr", attr)
                self._child(vars(mod)[attr], f"{name}.{attr}")

    def _module_object(self, mod: types.ModuleType) -> None:
        mod_name = getattr(mod, "__name__", "?")
        self._emit("module", mod_name)
        if is_library_module(mod_name):
            self._emit("version", _package_version(_top(mod_name)) or "")

    def _builtin(self, obj: Any) -> None:
        owner = getattr(obj, "__self__", None)
        module = getattr(obj, "__module__", None) or getattr(type(owner), "__module__", None)
        qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        self._emit("builtin", f"{module}.{qualname}")
        # A method bound to an object computes with that object (pybind11's function records
        # are the implementation's own, not data).
        if (owner is not None and not isinstance(owner, (types.ModuleType, type))
                and type(owner).__module__ != "pybind11_builtins"):
            self._child(owner, "__self__")

    def _class(self, cls: type) -> None:
        module = cls.__module__
        really = module != "builtins" or getattr(builtins, cls.__qualname__, None) is cls  # exec'd code claims builtins
        if is_library_module(module) and really and "<locals>" not in cls.__qualname__:
            self._emit("libclass", f"{module}.{cls.__qualname__}@{_package_version(_top(module))}")
            return
        self._emit("class", cls.__qualname__)
        for i, base in enumerate(cls.__bases__):
            self._child(base, f"__bases__[{i}]")
        ignore = set(vars(cls).get(KEY_IGNORE, ()) or ())
        for key, value in list(vars(cls).items()):
            if key in _CLASS_SKIP or key in ignore:
                continue
            self._emit("classattr", key)
            self._setup += key in _SETUP_METHODS
            try:
                self._child(value, key)
            finally:
                self._setup -= key in _SETUP_METHODS

    # ------------------------------------------------------------------ objects
    def _module(self, m: nn.Module) -> None:
        self._emit("nn.Module")
        self._child(type(m), "__class__")
        graph_module = isinstance(m, torch.fx.GraphModule)
        if graph_module:  # its generated code (the class's forward, hashed with it, calls it)
            self._emit("fx.code", m.code)
        # Bookkeeping that a module declares not to change what it computes (a call counter,
        # the last attention map kept for display): fastft_key_ignore = ("calls", ...).
        ignore = set(getattr(m, KEY_IGNORE, ()) or ())
        for key, value in list(vars(m).items()):
            if (key in _MODULE_SKIP or key.startswith("_fastft_") or key in ignore or key == KEY_IGNORE
                    or (graph_module and key in _GRAPH_MODULE_SKIP)):
                continue
            self._emit("attr", key)
            self._child(value, key)
            self._mark(key)
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(m, kind, None) or {}
            if hooks:  # the hooks in order; their ids are process counters
                self._emit(kind, str(len(hooks)))
                self._child(list(hooks.values()), kind)
                with_kwargs = getattr(m, kind + "_with_kwargs", {})
                self._emit("with_kwargs", repr([k in with_kwargs for k in hooks]))
                self._mark(kind.strip("_").replace("_", " "))
        for name, p in list(m._parameters.items()):
            self._emit("param", name)
            self._registered(p, name)
            self._mark(name)
        for name, b in list(m._buffers.items()):
            self._emit("buffer", name)
            self._registered(b, name)
            self._mark(name)
        for name, child in list(m._modules.items()):
            self._emit("child", name)
            self._child(child, name)

    def _mark(self, name: str) -> None:
        if self.trace is not None:
            digest = self._h.copy()
            if self._weights is not None:
                digest.update(self._weights.digest())
            self.trace.append((".".join(self._path[1:] + [name]), digest.digest()))

    def _registered(self, t: torch.Tensor | None, name: str) -> None:
        if t is None:
            self._emit("None")
        elif id(t) in self._masked:
            self._emit("masked")
        elif self._weights is not None and t.is_meta:
            self._note_opaque(f"{name} is a meta tensor (no data)")
        elif self._weights is not None:
            self._emit("layout", f"{t.dtype}{tuple(t.shape)}")
            self._weights.update(".".join(self._path + [name]).encode() + tensor_digest(t))
        else:
            self._child(t, name)

    def _object(self, obj: Any) -> None:
        cls = type(obj)
        self._emit("object")
        self._child(cls, "__class__")
        if dataclasses.is_dataclass(obj) or _plain_state(cls):
            state = obj.__getstate__() if hasattr(obj, "__getstate__") else getattr(obj, "__dict__", None)
            if state is None and not hasattr(obj, "__dict__") and not _slots(cls):
                raise _Opaque(f"a {_type_name(obj)} with no readable state")
            self._child(state, "__getstate__()")
            return
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception as exc:
            raise _Opaque(f"a {_type_name(obj)}, whose content cannot be read ({type(exc).__name__}: {exc})") from None
        if isinstance(reduced, str):  # a global singleton, pickled by name
            self._emit("global", reduced)
            return
        self._emit("reduce", str(len(reduced)))
        parts = list(reduced) + [None] * (5 - len(reduced))
        self._child(parts[0], "__reduce__()[0]")
        self._child(parts[1], "__reduce__()[1]")
        self._child(parts[2], "__reduce__()[2]")
        if parts[3] is not None:
            self._child(list(parts[3]), "__reduce__()[3]")
        if parts[4] is not None:
            self._child(list(parts[4]), "__reduce__()[4]")


def _cell_values(fn: types.FunctionType) -> list[Any]:
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name assigned later)
            cells.append("<empty cell>")
    return cells


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME", "STORE_NAME", "DELETE_NAME"})


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code reads or writes as globals (nested code objects too)."""
    found = {ins.argval for ins in dis.get_instructions(code) if ins.opname in _GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _global_names(const)
    return found


def _imports(code: types.CodeType) -> set[str]:
    """Modules imported by ``import`` statements inside the code (nested code objects too)."""
    found = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "IMPORT_NAME"}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _imports(const)
    return found


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _slots(cls: type) -> list[str]:
    return [s for c in cls.__mro__ for s in getattr(c, "__slots__", ())]


def _plain_state(cls: type) -> bool:
    """Whether instances pickle by their state alone (no custom ``__reduce__``): then their
    ``__getstate__()`` (``__dict__`` and slots by default) is what they compute with."""
    return (getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
            and getattr(cls, "__reduce__", None) is object.__reduce__
            and cls.__module__ != "builtins" and (hasattr(cls, "__dict__") or bool(_slots(cls))))


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
