"""How objects are hashed: ``nn.Module`` objects, their registered weights, other objects.

A mixin of :class:`~fastft.hashing.content.ContentHasher` (it walks values with the
hasher's ``_child``, ``_emit``, ``_mark`` and ``_note_opaque``): a module by its class,
attributes, hooks, parameters, buffers and submodules; the user's objects by all they hold;
other objects by their state, as pickle gives it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fastft.hashing._common import KEY_IGNORE, Opaque, ignored, is_library_class, type_name
from fastft.hashing.values import tensor_digest

__all__ = ["ObjectHashing"]


# ---------------------------------------------------------------------------- what is skipped
#: nn.Module bookkeeping that does not change what ``forward`` computes.
_MODULE_SKIP = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_is_full_backward_hook",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_compiled_call_impl",
        "_version",
        "_is_torch_compile",  # torch.compile's marks
    }
)
#: torch.fx.GraphModule internals: its generated code stands for the graph.
_GRAPH_MODULE_SKIP = frozenset(
    {
        "_graph",
        "_code",
        "_lineno_map",
        "_prologue_start",
        "_tracer_cls",
        "_tracer_extras",
        "meta",
        "shape_env",
        "_create_node_hooks",
        "_deepcopy_hooks",
        "_erase_node_hooks",
        "_replace_hooks",
    }
)


# ---------------------------------------------------------------------------- the mixin
class ObjectHashing:
    """The modules and objects :class:`~fastft.hashing.content.ContentHasher` hashes by value."""

    def _module(self, m: nn.Module) -> None:
        self._emit("nn.Module")
        self._child(type(m), "__class__")
        graph_module = isinstance(m, torch.fx.GraphModule)
        if graph_module:  # its generated code (the class's forward, hashed with it, calls it)
            self._emit("fx.code", m.code)
        if not self._eval_mode:  # a transform runs in its own mode (dropout on or off)
            self._emit("training", repr(m.training))
        # Bookkeeping that a module declares not to change what it computes (a call counter,
        # the last attention map kept for display): fastft_key_ignore = ("calls", ...).
        # Read without the instance's __getattr__ (a model may answer anything from a dict,
        # or raise).
        ignore = ignored(vars(m).get(KEY_IGNORE) or getattr(type(m), KEY_IGNORE, ()))
        for key, value in list(vars(m).items()):
            if (
                key in _MODULE_SKIP
                or key == "training"
                or key.startswith("_fastft_")
                or key in ignore
                or key == KEY_IGNORE
                or (graph_module and key in _GRAPH_MODULE_SKIP)
            ):
                continue
            self._emit("attr", key)
            self._child(value, key)
            self._mark(key)
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = vars(m).get(kind) or {}
            if hooks:  # the hooks in order; their ids are process counters
                self._emit(kind, str(len(hooks)))
                self._child(list(hooks.values()), kind)
                with_kwargs = vars(m).get(kind + "_with_kwargs", {})
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

    def _registered(self, t: torch.Tensor | None, name: str) -> None:
        if t is None:
            self._emit("None")
        elif id(t) in self._masked:
            self._emit("masked")
        elif self._weights_mode == "inline":
            self._child(t, name)
        elif t.is_meta:
            self._note_opaque(f"{name} is a meta tensor (no data)")
        else:
            self._emit("layout", f"{t.dtype}{tuple(t.shape)}")
            if self._weights is not None:
                self._weights.update(".".join(self._path + [name]).encode() + tensor_digest(t))

    def _object(self, obj: Any) -> None:
        cls = type(obj)
        self._emit("object")
        self._child(cls, "__class__")
        if not is_library_class(cls) and (hasattr(obj, "__dict__") or _slots(cls)):
            # The user's object by all it holds (its __getstate__ may leave out what it
            # computes with).
            self._child(dict(getattr(obj, "__dict__", {})), "__dict__")
            self._child(
                {
                    s: getattr(obj, s, "<unset>")
                    for s in _slots(cls)
                    if s not in ("__dict__", "__weakref__")
                },
                "__slots__",
            )
            return
        if dataclasses.is_dataclass(obj) or _plain_state(cls):
            state = (
                obj.__getstate__()
                if hasattr(obj, "__getstate__")
                else getattr(obj, "__dict__", None)
            )
            if state is None and not hasattr(obj, "__dict__") and not _slots(cls):
                raise Opaque(f"a {type_name(obj)} with no readable state")
            self._child(state, "__getstate__()")
            return
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception as exc:
            raise Opaque(
                f"a {type_name(obj)}, whose content cannot be read ({type(exc).__name__}: {exc})"
            ) from None
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


def _slots(cls: type) -> list[str]:
    return [
        s
        for c in cls.__mro__
        for s in (
            [c.__slots__]
            if isinstance(getattr(c, "__slots__", ()), str)
            else getattr(c, "__slots__", ())
        )
    ]


def _plain_state(cls: type) -> bool:
    """Whether instances pickle by their state alone (no custom ``__reduce__``): then their
    ``__getstate__()`` (``__dict__`` and slots by default) is what they compute with."""
    return (
        getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
        and getattr(cls, "__reduce__", None) is object.__reduce__
        and cls.__module__ != "builtins"
        and (hasattr(cls, "__dict__") or bool(_slots(cls)))
    )
