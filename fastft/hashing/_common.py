"""What the two halves of the content hasher share: constants, the opaque signal, small helpers."""

from __future__ import annotations

import builtins
import types
from typing import Any

import numpy as np

from fastft.hashing import reads

#: A class or instance attribute of an ``nn.Module``: names of its attributes that do not
#: change what it computes (a call counter, outputs kept for display), left out of its hash.
KEY_IGNORE = "fastft_key_ignore"
#: Values whose repr is their content (the same in every process): hashed in bulk in containers.
PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
BUILTIN_TYPES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    np.ufunc,
)


class Opaque(Exception):
    """This object's content cannot be seen (caught by the hasher, which notes where and why)."""


def is_library_class(cls: type) -> bool:
    """A class of the standard library or of an installed library, defined at module level
    (code exec'd without a module name claims ``builtins``: it is the user's)."""
    module = cls.__module__
    if module == "builtins" and getattr(builtins, cls.__qualname__, None) is not cls:
        return False
    return reads.is_library_module(module) and "<locals>" not in cls.__qualname__


def ignored(names: Any) -> set[str]:
    """``fastft_key_ignore`` as a set of names (one name written without a tuple's comma too)."""
    if not names:
        return set()
    return {names} if isinstance(names, str) else set(names)


def cell_values(fn: types.FunctionType) -> list[Any]:
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name assigned later)
            cells.append("<empty cell>")
    return cells


def type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
