"""Load the native extension ``fastft._C`` and describe what it offers.

``import fastft`` must never fail because of the native module: when it is missing, broken,
built from other sources than this Python code (its integer codes differ), or disabled with
``FASTFT_DISABLE_NATIVE=1``, fastft warns once and every op runs its pure-PyTorch reference
implementation instead. ``FASTFT_REQUIRE_NATIVE=1`` turns that fallback into a
:class:`~fastft.errors.NativeUnavailableError` (a :class:`~fastft.errors.NativeMismatchError`
for a mismatched build), for setups where the slow path must never be taken silently. It
asks for fastft._C only, not for its CUDA kernels or a GPU.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Any

from fastft.errors import NativeMismatchError, NativeUnavailableError

_DISABLE_ENV = "FASTFT_DISABLE_NATIVE"
_REQUIRE_ENV = "FASTFT_REQUIRE_NATIVE"
_REBUILD = (
    "Rebuild it from the fastft source tree with `pip install -e .` "
    "(needs a C++ compiler and CMake)"
)

#: The Python half of the integer codes of csrc/common/codes.h and csrc/kernels/cuda/kernels.h,
#: as ``fastft._C.codes()`` reports them: {table: {name: int}}. Dtypes are named as in
#: ``torch`` (``torch.float16`` -> "float16"). It lives here rather than in fastft/ops/_codes.py
#: (which derives its tables from it) because it is checked while the module loads, before
#: fastft.ops can be imported. Change a code on both sides, then rebuild.
NATIVE_CODES: dict[str, dict[str, int]] = {
    "dtypes": {
        "float32": 0,
        "float16": 1,
        "bfloat16": 2,
        "int8": 3,
        "bool": 4,
        "uint8": 4,  # masks: read as bytes, nonzero = true
        "int32": 5,
        "int64": 6,
    },
    "pools": {"none": 0, "mean": 1, "max": 2, "masked_mean": 3, "first": 4},
    # A CPU kernel's status: (code, index into rows).
    "statuses": {"ok": 0, "row_out_of_range": 1, "duplicate_row": 2, "bad_argument": 3},
    # A CUDA launch's status: (code, message).
    "cuda_launch": {"ok": 0, "bad_argument": 3, "cuda_error": 100},
    # The row verdict a CUDA kernel leaves in scratch[0]: rows_ok, or (kind << kind_shift) | index.
    "cuda_rows": {"rows_ok": -1, "kind_shift": 62, "kind_out_of_range": 0, "kind_duplicate_row": 1},
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _disabled_by_env() -> bool:
    return _env_flag(_DISABLE_ENV)


def _required_by_env() -> bool:
    return _env_flag(_REQUIRE_ENV)


def code_differences(
    reported: Any, expected: dict[str, dict[str, int]] = NATIVE_CODES
) -> list[str]:
    """How the codes a module reports differ from ``expected``, one line each ([] if equal)."""
    if not isinstance(reported, dict):
        return [f"codes() returned {type(reported).__name__}, not a dict of tables"]
    diffs = []
    for table in sorted(set(expected) | set(reported), key=str):
        if table not in reported:
            diffs.append(f"table {table!r} is missing from fastft._C")
        elif table not in expected:
            diffs.append(f"table {table!r} is unknown to this Python code")
        else:
            ours, theirs = expected[table], reported[table]
            if not isinstance(theirs, dict):
                diffs.append(
                    f"table {table!r} is a {type(theirs).__name__} in fastft._C, not a dict"
                )
                continue
            for name in sorted(set(ours) | set(theirs), key=str):
                if ours.get(name) != theirs.get(name):
                    diffs.append(
                        f"{table}[{name!r}] is {ours.get(name)} here but {theirs.get(name)} in "
                        "fastft._C"
                    )
    return diffs


def check_codes(module: Any) -> None:
    """Raise :class:`NativeMismatchError` unless ``module.codes()`` equals :data:`NATIVE_CODES`.

    A kernel handed a code that means something else to it (another dtype, another pool)
    would write wrong values without any error, so a mismatch is caught before any call.
    """
    path = getattr(module, "__file__", None)
    where = f"fastft._C ({path})" if path else "fastft._C"
    codes = getattr(module, "codes", None)
    if codes is None:
        diffs = ["it has no codes() function"]
    else:
        diffs = code_differences(codes())
    if not diffs:
        return
    shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    raise NativeMismatchError(
        f"the native extension {where} does not match this fastft Python code ({shown}). "
        f"It was built from other sources. {_REBUILD}."
    )


def _import_checked() -> ModuleType:
    """Import ``fastft._C`` and check its codes; raise NativeUnavailableError if unusable."""
    try:
        module = importlib.import_module("fastft._C")
    except Exception as exc:  # ImportError, or an OSError from a broken shared library
        raise NativeUnavailableError(
            f"the native extension fastft._C could not be loaded ({type(exc).__name__}: {exc}). "
            f"{_REBUILD}."
        ) from exc
    check_codes(module)
    return module


@lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    """Import ``fastft._C`` once; return (module or None, reason it is unavailable).

    A module whose codes differ from ours is treated like a missing one: fastft warns once
    and runs the reference kernels, which give the same results (slower), and build_info()
    reports why. Running the kernels would give silently wrong values, and refusing to
    import would break every user of a stale build (for instance after a ``git pull`` that
    changed only Python files) over what a rebuild fixes. Setups that must not run slowly
    set FASTFT_REQUIRE_NATIVE=1 and get the error instead.
    """
    required = _required_by_env()
    if _disabled_by_env():
        if required:
            raise NativeUnavailableError(
                f"{_REQUIRE_ENV}=1 asks for the native extension fastft._C but {_DISABLE_ENV}=1 "
                "disables it; unset one of them."
            )
        return None, f"disabled by {_DISABLE_ENV}=1"
    try:
        return _import_checked(), None
    except NativeUnavailableError as exc:
        if required:
            raise
        problem = exc
    root = problem.__cause__ or problem  # the ImportError of a missing module, as before
    reason = f"{type(root).__name__}: {root}"
    warnings.warn(
        f"fastft: {problem} Using the slower pure-PyTorch kernels meanwhile; set "
        f"{_DISABLE_ENV}=1 to silence this warning, or {_REQUIRE_ENV}=1 to make it an error.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, reason


def native_module() -> ModuleType | None:
    """The loaded ``fastft._C`` module, or ``None`` when the reference path is in use."""
    return _load()[0]


def has_native() -> bool:
    """True when the native CPU kernels are loaded and will be used."""
    return native_module() is not None


@lru_cache(maxsize=1)
def cuda_runtime_error() -> str | None:
    """Why the CUDA runtime linked into fastft._C cannot run here (None when it can, or when
    fastft._C has no CUDA kernels).

    fastft._C carries its own (static) CUDA runtime, which needs a driver at least as new as
    the nvcc it was built with; ``cudaGetDeviceCount`` tells. The usual errors are
    cudaErrorInsufficientDriver (an older driver) and cudaErrorNoDevice.
    """
    mod = native_module()
    if mod is None or not bool(mod.build_info().get("cuda", False)):
        return None
    info = mod.cuda_runtime_info()
    if not info["error"]:
        return None
    driver = (
        "no CUDA driver is installed"
        if not info["driver_version"]
        else f"the driver supports CUDA {info['driver_version']}"
    )
    return (
        f"{info['error']} (fastft._C carries CUDA runtime {info['runtime_version']}; {driver}). "
        "Rebuild fastft with an nvcc no newer than the driver, or with FASTFT_CUDA=OFF."
    )


def cuda_problem() -> str | None:
    """Why fastft's CUDA kernels will not serve CUDA tensors here; None when they will."""
    mod, reason = _load()
    if mod is None:
        return f"the native extension fastft._C is not in use ({reason})"
    if not bool(mod.build_info().get("cuda", False)):
        return (
            "fastft._C was built without CUDA kernels (no nvcc found at build time; "
            "FASTFT_CUDA=ON makes that an error)"
        )
    error = cuda_runtime_error()
    if error is not None:
        return f"the CUDA runtime in fastft._C cannot run: {error}"
    import torch

    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False; "
            f"torch built for CUDA {torch.version.cuda})"
        )
    return None


def has_cuda() -> bool:
    """True when fastft's CUDA kernels will serve CUDA tensors: compiled in, their CUDA runtime
    runs with the installed driver, and torch sees a device. ``build_info()["cuda_problem"]``
    says why not."""
    return cuda_problem() is None


def build_info() -> dict[str, Any]:
    """How the native module was built: compiler, OpenMP, CUDA, version.

    Always returns a dict; ``native`` is False (with ``reason``) when the reference path is
    in use, e.g. ``reason`` starts with "NativeMismatchError" for a module built from other
    sources than this Python code.
    """
    mod, reason = _load()
    if mod is None:
        return {
            "native": False,
            "reason": reason,
            "cuda": False,
            "openmp": False,
            "cuda_problem": cuda_problem(),
        }
    info = dict(mod.build_info())
    info["native"] = True
    if info.get("cuda"):
        info["cuda_runtime_error"] = cuda_runtime_error()
    info["cuda_problem"] = cuda_problem()  # None when fastft.has_cuda()
    return info
