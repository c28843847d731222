"""How code is hashed: functions, classes, methods, the modules code reads, TorchScript.

A mixin of :class:`~fastft.hashing.content.ContentHasher` (it walks values with the
hasher's ``_child``, ``_emit`` and ``_note_opaque``). The user's code is hashed by value
(bytecode, constants, defaults, closure, what it reads); library code by name and version,
with what was changed in a library (a replaced method or function, a registered function)
by value. See :mod:`fastft.hashing.reads` for whose code is whose and what code reads.
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import os
import re
import sys
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.hashing import reads
from fastft.hashing._common import (
    BUILTIN_TYPES,
    KEY_IGNORE,
    PLAIN,
    cell_values,
    ignored,
    is_library_class,
)

#: Class attributes that are not behaviour.
_CLASS_SKIP = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "_abc_impl",
        "__slots__",
        "__slotnames__",
        "__annotate_func__",
        "__annotations_cache__",
    }
)
#: Methods that make, copy or show an object and never run when it computes: hashed by their
#: code alone. What they read (a vocabulary file opened in __init__) is in the object's state,
#: which is hashed itself, so reading files there does not make the hash opaque.
_SETUP_METHODS = frozenset(
    {
        "__init__",
        "__new__",
        "__init_subclass__",
        "__post_init__",
        "__setstate__",
        "__getstate__",
        "__reduce__",
        "__reduce_ex__",
        "__deepcopy__",
        "__copy__",
        "__repr__",
        "__str__",
        "__format__",
        "__dir__",
        "__sizeof__",
        "__del__",
        "extra_repr",
    }
)
_CODE_FIELDS = (
    "co_argcount",
    "co_posonlyargcount",
    "co_kwonlyargcount",
    "co_flags",
    "co_code",
    "co_names",
    "co_varnames",
    "co_freevars",
    "co_cellvars",
    "co_exceptiontable",
)
_MISSING = object()


class CodeHashing:
    """The code half of the content hasher (see the module docstring)."""

    def _code(self, code: types.CodeType) -> None:
        # No file name, line numbers or position tables: moving code does not change it.
        self._emit("code", code.co_name)
        for field in _CODE_FIELDS:
            value = getattr(code, field, None)
            if (
                field == "co_flags"
            ):  # without the __future__ flags, which only change how it was compiled
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
        if reads.is_library_code(module, fn.__code__):
            # The library's code by name and version; what a library closure or default was
            # given (a factory's arguments) by value.
            self._emit(
                "libfn",
                f"{module}.{fn.__qualname__}@{reads.library_version(module.partition('.')[0])}",
            )
            if fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__:
                self._child(fn.__defaults__, "__defaults__")
                self._child(fn.__kwdefaults__, "__kwdefaults__")
                self._child(cell_values(fn), "__closure__")
            return
        # The user's code by value, not by where it lives: the same function run as a script
        # (__main__) or imported has the same hash.
        self._emit("fn", fn.__qualname__)
        self._code(fn.__code__)
        self._child(fn.__defaults__, "__defaults__")
        self._child(fn.__kwdefaults__, "__kwdefaults__")
        self._child(cell_values(fn), "__closure__")
        self._globals(fn)
        self._child(dict(getattr(fn, "__dict__", {})), "__dict__")

    def _globals(self, fn: types.FunctionType) -> None:
        """What ``fn``'s code reads from its globals: every global it loads, and along the
        attribute chains it reads of the user's modules (``cfg.sub.MEAN``), the values at
        their ends; library modules by name and version. Code that reads the outside world
        makes the hash opaque (outside setup code)."""
        scope = fn.__globals__
        builtin_names = scope.get("__builtins__", builtins)
        builtin_names = builtin_names if isinstance(builtin_names, dict) else vars(builtin_names)
        closure = dict(zip(fn.__code__.co_freevars, cell_values(fn)))
        for why in reads.outside_reads(fn.__code__, {**scope, **closure}, builtin_names):
            self._note_opaque(f"the code {why}")
        chains = [c for c in reads.attribute_chains(fn.__code__) if c[0] not in closure]
        escaping = reads.escaping_globals(fn.__code__)
        for name in sorted(reads.global_names(fn.__code__)):
            if name in scope:
                value = scope[name]
                self._emit("global", name)
                if isinstance(value, types.ModuleType):
                    self._module_reference(
                        value, name, [c[1:] for c in chains if c[0] == name], name in escaping
                    )
                else:
                    self._child(value, name)
            elif name in builtin_names:
                self._emit("builtin", name)
        for module_name in sorted(reads.imports(fn.__code__)):  # `import cfg` inside the function
            self._imported(module_name)

    def _imported(self, module_name: str) -> None:
        """A module imported inside a function: a library's by name and version; the user's
        whole (loaded, or its source file when it is not imported yet)."""
        self._emit("import", module_name)
        if reads.is_library_module(module_name):
            self._emit("version", reads.library_version(module_name.partition(".")[0]) or "")
            return
        loaded = sys.modules.get(module_name)
        if loaded is not None:
            self._child(loaded, module_name)
            return
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        if origin and os.path.isfile(origin):
            with open(origin, "rb") as f:
                self._emit("source", f.read())
        else:
            self._note_opaque(f"the code imports {module_name}, which cannot be found to be read")

    def _module_reference(
        self, mod: types.ModuleType, name: str, chains: list[tuple[str, ...]], escapes: bool
    ) -> None:
        """A module the code reads from: a library's by name and version; the user's by what
        the code reads of it, following each attribute chain through the user's submodules to
        the value it ends at, or whole when the code uses the module otherwise (passes it on,
        gives it another name, looks names up in it with getattr)."""
        mod_name = getattr(mod, "__name__", name)
        if reads.is_library_module(mod_name):
            self._emit(
                "libmodule", f"{mod_name}@{reads.library_version(mod_name.partition('.')[0])}"
            )
            for chain in sorted(set(chains)):  # a library function replaced (F.gelu = ...)
                value = reads.resolve(mod, chain)
                if _replaced(value, chain[-1]):
                    self._emit("patched", ".".join(chain))
                    self._child(value, ".".join((name, *chain)))
            return
        if escapes or not chains:
            self._module_value(mod)
            return
        self._emit("module", mod_name)
        for chain in sorted(set(chains)):
            value: Any = mod
            path = [name]
            for attr in chain:
                if not isinstance(value, types.ModuleType) or reads.is_library_module(
                    value.__name__
                ):
                    break
                # A PEP 562 module __getattr__ computes what is not in the namespace: its
                # answer counts.
                value = vars(value)[attr] if attr in vars(value) else getattr(value, attr, _MISSING)
                path.append(attr)
                if value is _MISSING:
                    break
            self._emit("chain", ".".join(path))
            if value is not _MISSING and not (
                isinstance(value, types.ModuleType) and not reads.is_library_module(value.__name__)
            ):
                self._child(value, ".".join(path))

    def _module_value(self, mod: types.ModuleType) -> None:
        """A module held as a value (an attribute, a default argument): a library's by name and
        version; the user's by everything in it (its functions by value, its settings)."""
        mod_name = getattr(mod, "__name__", "?")
        self._emit("module", mod_name)
        if reads.is_library_module(mod_name):
            self._emit("version", reads.library_version(mod_name.partition(".")[0]) or "")
            return
        for key, value in list(vars(mod).items()):
            if key.startswith("__") and key.endswith("__"):
                continue
            self._emit("attr", key)
            self._child(value, f"{mod_name}.{key}")

    def _method(self, obj: types.MethodType) -> None:
        self._emit("method", obj.__func__.__name__)
        self._child(obj.__func__, "__func__")
        self._child(obj.__self__, "__self__")

    def _partial(self, obj: functools.partial) -> None:
        self._emit("partial", type(obj).__qualname__)
        self._child(obj.func, "func")
        self._child(obj.args, "args")
        self._child(obj.keywords, "keywords")
        self._child(getattr(obj, "__dict__", {}), "__dict__")

    def _builtin(self, obj: Any) -> None:
        owner = getattr(obj, "__self__", None)
        module = getattr(obj, "__module__", None) or getattr(type(owner), "__module__", None)
        qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        self._emit("builtin", f"{module}.{qualname}")
        if f"{module}.{qualname}" in reads.IMPURE_FUNCTIONS:
            self._note_opaque(f"{module}.{qualname} reads a file")
        # A method bound to an object computes with that object (pybind11's function records
        # are the implementation's own, not data).
        if (
            owner is not None
            and not isinstance(owner, (types.ModuleType, type))
            and type(owner).__module__ != "pybind11_builtins"
        ):
            self._child(owner, "__self__")

    def _class(self, cls: type) -> None:
        module = cls.__module__
        if is_library_class(cls):
            self._emit(
                "libclass",
                f"{module}.{cls.__qualname__}@{reads.library_version(module.partition('.')[0])}",
            )
            self._patched_methods(cls, module)
            return
        self._emit("class", cls.__qualname__)
        # Names a class leaves out of its hash apply to its base classes' attributes too.
        ignore = ignored(getattr(cls, KEY_IGNORE, ())) | (
            self._class_ignore[-1] if self._class_ignore else set()
        )
        self._class_ignore.append(ignore)
        try:
            for i, base in enumerate(cls.__bases__):
                self._child(base, f"__bases__[{i}]")
            for key, value in list(vars(cls).items()):
                if key in _CLASS_SKIP or key in ignore:
                    continue
                self._emit("classattr", key)
                if key in _SETUP_METHODS and isinstance(value, types.FunctionType):
                    self._emit("setup", key)  # never runs when the object computes: its code alone
                    self._code(value.__code__)
                    self._child(value.__defaults__, "__defaults__")
                    continue
                self._child(value, key)
        finally:
            self._class_ignore.pop()

    def _patched_methods(self, cls: type, module: str) -> None:
        """What the user changed in a library class (a monkeypatch): its methods replaced by
        the user's code, its plain class attributes (``nn.Linear.gain = 2.0``), and the
        library functions its methods call that the user replaced (``F.gelu = ...``)."""
        for klass in cls.__mro__:
            # nn.Module itself is left out: torch.compile patches it once a process compiles.
            if klass in (object, nn.Module) or not is_library_class(klass):
                continue
            for key, value in list(vars(klass).items()):
                if key in _CLASS_SKIP or key == "__abstractmethods__":
                    continue
                if isinstance(value, types.FunctionType):
                    if (
                        _is_user_function(value)
                        or value.__qualname__ != f"{klass.__qualname__}.{key}"
                    ):
                        self._emit("patched", key)  # the user's code, or another function put there
                        self._child(value, key)
                    for target in _replaced_references(value):
                        self._emit("patched call", target[0])
                        self._child(target[1], target[0])
                elif type(value) in PLAIN:
                    self._emit("classattr", f"{key}={value!r}"[:200])
                elif isinstance(value, (tuple, frozenset)) and all(type(v) in PLAIN for v in value):
                    shown = (
                        sorted(map(repr, value))
                        if isinstance(value, frozenset)
                        else list(map(repr, value))
                    )
                    self._emit("classattr", f"{key}={shown}"[:400])
                elif isinstance(value, (functools.partial, functools.partialmethod)) or (
                    callable(value)
                    and not isinstance(
                        value, (type, staticmethod, classmethod, property, *BUILTIN_TYPES)
                    )
                ):
                    self._emit("patched", key)  # a partial or callable object put on the class
                    self._child(value, key)

    def _script(self, obj: Any) -> None:
        """TorchScript: every module's code and attributes (read through the compiled module:
        its Python object holds none of them), parameters and buffers."""
        self._emit("torchscript", type(obj).__name__)
        if not isinstance(obj, torch.jit.ScriptModule):
            self._emit("code", getattr(obj, "code", "") or "")
            return
        for name, sub in obj.named_modules():
            self._emit("submodule", name)
            self._emit("code", getattr(sub, "code", "") or "")
            for attr in _script_attributes(sub):
                value = sub._c.getattr(attr)
                if not isinstance(value, torch._C.ScriptObject):  # submodules: in named_modules
                    self._child(value, f"{name}.{attr}")
        self._child(dict(obj.state_dict()), "state_dict")


def _is_user_function(value: Any) -> bool:
    return isinstance(value, types.FunctionType) and not reads.is_library_code(
        value.__module__, value.__code__
    )


def _replaced(value: Any, name: str) -> bool:
    """Whether a library module's attribute ``name`` holds something put there in place of the
    library's own function: the user's code, another function (``F.relu = F.leaky_relu``),
    a partial or a callable object of the user's."""
    if isinstance(value, types.MethodType):  # a bound method: replaced when its function is
        value = value.__func__
    if isinstance(value, types.FunctionType):
        return _is_user_function(value) or value.__name__ != name
    if isinstance(value, (functools.partial, functools.partialmethod)):
        return True
    return (
        callable(value)
        and not isinstance(value, (type, *BUILTIN_TYPES))
        and not is_library_class(type(value))
    )


#: How deep the calls of library functions are followed to find a replaced one (a model's
#: class calls F.multi_head_attention_forward, which calls F.softmax).
_LIBRARY_CALL_DEPTH = 3


def _replaced_references(
    fn: types.FunctionType, depth: int = _LIBRARY_CALL_DEPTH, seen: set | None = None
) -> list[tuple[str, Any]]:
    """What a library function calls through its module's globals (``F.gelu``,
    ``apply_rotary_pos_emb``) that was replaced (see :func:`_replaced`), following the
    library functions it calls ``depth`` levels down."""
    seen = set() if seen is None else seen
    if fn.__code__ in seen:
        return []
    seen.add(fn.__code__)
    found, callees = [], []
    scope = fn.__globals__
    for chain in sorted(reads.attribute_chains(fn.__code__)):
        head = scope.get(chain[0])
        if isinstance(head, types.ModuleType):
            value = reads.resolve(head, chain[1:])
            if _replaced(value, chain[-1]):
                found.append((".".join(chain), value))
            elif isinstance(value, types.FunctionType):
                callees.append(value)
    for name in sorted(reads.global_names(fn.__code__)):
        value = scope.get(name)
        if isinstance(value, types.FunctionType):
            if _is_user_function(value) or value.__name__ != name and not name.startswith("_"):
                found.append((name, value))
            else:
                callees.append(value)
        elif (
            isinstance(value, Mapping)
            and not isinstance(value, types.ModuleType)
            and len(value) <= 1000
        ):
            # A registry of functions the library looks up (transformers' attention functions):
            # a function of the user's registered in it.
            for key, entry in list(value.items()):
                if _is_user_function(entry) or isinstance(entry, functools.partial):
                    found.append((f"{name}[{key!r}]", entry))
    if depth > 1:
        for callee in callees:
            found += _replaced_references(callee, depth - 1, seen)
    return found


def _script_attributes(module: Any) -> list[str]:
    """Names of a TorchScript module's attributes (its compiled type lists them when dumped)."""
    text = module._c.dump_to_str(False, True, False)
    block = text.split("attributes {", 1)[1].split("\n  }", 1)[0] if "attributes {" in text else ""
    return sorted({m.group(1) for m in re.finditer(r"^ {4}(\w+) = ", block, re.M)} - {"training"})
