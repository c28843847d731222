"""Load the native extension ``fastft._C`` and describe what it offers.

``import fastft`` must never fail because of the native module: when it is missing, broken,
or disabled with ``FASTFT_DISABLE_NATIVE=1``, fastft warns once and every op runs its
pure-PyTorch reference implementation instead.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Any

_DISABLE_ENV = "FASTFT_DISABLE_NATIVE"


def _disabled_by_env() -> bool:
    return os.environ.get(_DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    """Import ``fastft._C`` once; return (module or None, reason it is unavailable)."""
    if _disabled_by_env():
        return None, f"disabled by {_DISABLE_ENV}=1"
    try:
        _C = importlib.import_module("fastft._C")
    except Exception as exc:  # ImportError, or an OSError from a broken shared library
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "fastft: the native extension fastft._C could not be loaded "
            f"({reason}); using the slower pure-PyTorch kernels. Rebuild it with "
            "`pip install -e .` (needs a C++ compiler and CMake), or set "
            f"{_DISABLE_ENV}=1 to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    return _C, None


def native_module() -> ModuleType | None:
    """The loaded ``fastft._C`` module, or ``None`` when the reference path is in use."""
    return _load()[0]


def has_native() -> bool:
    """True when the native CPU kernels are loaded and will be used."""
    return native_module() is not None


def has_cuda() -> bool:
    """True when CUDA kernels were compiled in *and* a usable CUDA device is present."""
    mod = native_module()
    if mod is None or not bool(mod.build_info().get("cuda", False)):
        return False
    import torch

    return torch.cuda.is_available()


def build_info() -> dict[str, Any]:
    """How the native module was built: compiler, OpenMP, CUDA, version.

    Always returns a dict; ``native`` is False (with ``reason``) when the reference path is
    in use.
    """
    mod, reason = _load()
    if mod is None:
        return {"native": False, "reason": reason, "cuda": False, "openmp": False}
    info = dict(mod.build_info())
    info["native"] = True
    return info
