"""The boundary between fastft/ops/*.py and fastft._C: named arguments and shared codes.

Every bound function takes keyword-only named arguments, so two swapped integers cannot
run silently; every call from Python names all of them (checked on the source, so the CUDA
calls are covered without a GPU). The integer codes Python keeps equal those the module
reports, and a module whose codes differ is refused with a clear NativeMismatchError.
"""

from __future__ import annotations

import ast
import copy
import inspect
import re
import types
from pathlib import Path

import pytest
import torch

from fastft import _native
from fastft.errors import FastFTError, NativeMismatchError, NativeUnavailableError
from fastft.ops import _codes, _schemas

from helpers.native import needs_native

pytestmark = needs_native  # a run without fastft._C fails in conftest unless it opts out
OPS_DIR = Path(inspect.getfile(_codes)).parent


def native():
    return _native.native_module()


def bound_functions() -> dict:
    """name -> function, for every function fastft._C binds."""
    mod = native()
    return {
        name: getattr(mod, name)
        for name in dir(mod)
        if not name.startswith("_") and callable(getattr(mod, name))
    }


def bound_params(fn) -> list[str]:
    """The parameters of a pybind11 function, from its signature line ("*" marks keyword-only)."""
    first = fn.__doc__.splitlines()[0]
    inside = first[first.index("(") + 1 : first.rindex(") ->")]
    return re.findall(r"(?:^|, )(\*|\w+)(?=: |,|$)", inside)


# ---------------------------------------------------------------- named arguments


def test_every_bound_function_takes_named_keyword_only_arguments():
    funcs = bound_functions()
    assert {"cache_write_cpu", "cache_gather_cpu", "codes", "build_info"} <= set(funcs)
    for name, fn in funcs.items():
        params = bound_params(fn)
        if not params:
            continue
        assert params[0] == "*", f"{name}: arguments must be keyword-only, got {params}"
        unnamed = [p for p in params if re.fullmatch(r"arg\d+", p)]
        assert not unnamed, f"{name}: unnamed arguments {unnamed} (add py::arg in bindings.cpp)"
        assert len(set(params)) == len(params), name


def test_cache_write_cpu_names():
    assert bound_params(native().cache_write_cpu)[1:] == [
        "src_ptr",
        "src_dtype",
        "batch",
        "length",
        "dim",
        "src_stride_b",
        "src_stride_l",
        "src_stride_d",
        "rows_ptr",
        "dst_ptr",
        "dst_dtype",
        "cache_rows",
        "scales_ptr",
        "pool",
        "mask_ptr",
        "mask_dtype",
        "mask_stride_b",
        "mask_stride_l",
        "num_threads",
    ]


def gather_kwargs(src, rows, out):
    return dict(
        src_ptr=src.data_ptr(),
        src_dtype=_codes.DTYPE_CODES[src.dtype],
        cache_rows=src.shape[0],
        dim=src.shape[1],
        scales_ptr=0,
        rows_ptr=rows.data_ptr(),
        batch=rows.shape[0],
        out_ptr=out.data_ptr(),
        out_dtype=_codes.DTYPE_CODES[out.dtype],
        num_threads=1,
    )


def test_positional_or_misnamed_calls_are_refused():
    src, rows = torch.arange(12.0).reshape(4, 3), torch.tensor([3, 1])
    out = torch.zeros(2, 3)
    kwargs = gather_kwargs(src, rows, out)
    with pytest.raises(TypeError):
        native().cache_gather_cpu(*kwargs.values())  # the right values, in the right order
    with pytest.raises(TypeError):
        native().cache_gather_cpu(**{**{k: v for k, v in kwargs.items() if k != "dim"}, "dims": 3})
    with pytest.raises(TypeError):
        native().cache_gather_cpu(**{k: v for k, v in kwargs.items() if k != "batch"})
    assert bool((out == 0).all())
    assert tuple(native().cache_gather_cpu(**kwargs)) == (_codes.STATUS_OK, 0)
    assert torch.equal(out, src[rows])


def native_calls(path: Path):
    """(function name, call node) for every ``_C.<name>(...)`` call in a source file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "_C"
        ):
            yield node.func.attr, node


def test_python_calls_name_every_argument():
    """fastft/ops/*.py calls fastft._C by keyword only, with exactly the bound names."""
    funcs = bound_functions()
    called = set()
    for path in sorted(OPS_DIR.glob("*.py")):
        for name, call in native_calls(path):
            where = f"{path.name}:{call.lineno} _C.{name}"
            assert name in funcs or name.endswith("_cuda") or name.startswith("cuda_"), where
            assert not call.args, f"{where}: positional arguments"
            assert all(k.arg is not None for k in call.keywords), (
                f"{where}: ** arguments hide the names"
            )
            if name not in funcs:  # a CUDA function of a build without nvcc
                continue
            expected, got = bound_params(funcs[name])[1:], [k.arg for k in call.keywords]
            assert sorted(got) == sorted(expected), (
                f"{where}: differs in {sorted(set(got) ^ set(expected))}"
            )
            called.add(name)
    with_args = {name for name, fn in funcs.items() if bound_params(fn)}
    assert with_args <= called, f"never called from fastft/ops: {with_args - called}"


# ---------------------------------------------------------------- codes


def test_python_codes_equal_the_built_modules():
    assert native().codes() == _native.NATIVE_CODES
    assert _native.code_differences(native().codes()) == []
    _native.check_codes(native())  # what loading does; raises on a mismatch


def test_op_tables_cover_every_dtype_and_pool_the_ops_accept():
    names = _native.NATIVE_CODES["dtypes"]
    for dtype in {*_schemas.STORAGE_DTYPES, *_schemas.COMPUTE_DTYPES, *_schemas.MASK_DTYPES}:
        assert _codes.DTYPE_CODES[dtype] == names[str(dtype).replace("torch.", "")]
    assert set(_codes.POOL_CODES) == set(_schemas.POOLS)
    assert _codes.DTYPE_CODES[torch.uint8] == _codes.DTYPE_CODES[torch.bool]  # masks as bytes


def fake_module(codes):
    """A stand-in for fastft._C that reports ``codes``."""
    return types.SimpleNamespace(codes=lambda: codes, __file__="/somewhere/_C.so")


def test_a_changed_code_is_a_clear_mismatch_error():
    codes = copy.deepcopy(_native.NATIVE_CODES)
    codes["pools"]["max"] = 7
    codes["dtypes"]["float8"] = 9
    with pytest.raises(NativeMismatchError) as info:
        _native.check_codes(fake_module(codes))
    msg = str(info.value)
    assert "/somewhere/_C.so" in msg and "does not match this fastft Python code" in msg
    assert "pools['max'] is 2 here but 7 in fastft._C" in msg
    assert "dtypes['float8'] is None here but 9 in fastft._C" in msg
    assert "pip install -e ." in msg  # says how to fix it
    assert isinstance(info.value, NativeUnavailableError) and isinstance(info.value, FastFTError)


@pytest.mark.parametrize(
    "module,words",
    [
        (types.SimpleNamespace(), "no codes() function"),
        (
            fake_module({k: v for k, v in _native.NATIVE_CODES.items() if k != "cuda_rows"}),
            "table 'cuda_rows' is missing from fastft._C",
        ),
        (fake_module({**_native.NATIVE_CODES, "extra": {}}), "table 'extra' is unknown"),
        (fake_module([]), "not a dict"),
    ],
)
def test_other_mismatches_are_named(module, words):
    with pytest.raises(NativeMismatchError, match=re.escape(words)):
        _native.check_codes(module)
