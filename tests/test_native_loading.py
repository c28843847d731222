"""Loading the native module: a missing or mismatched one warns once and never breaks
``import fastft``, unless FASTFT_REQUIRE_NATIVE=1 asks for an error instead."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastft

from helpers.native import needs_native

_SWITCHES = ("FASTFT_DISABLE_NATIVE", "FASTFT_REQUIRE_NATIVE")


def clean_env(**env) -> dict:
    """This process's environment without the native-loading switches of the outer run
    (a suite may run with FASTFT_REQUIRE_NATIVE=1), plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if k not in _SWITCHES}, **env}


def run_python(code: str, **env) -> str:
    full_env = clean_env(**env)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + "\n" + out.stderr


def test_build_info_describes_the_build():
    info = fastft.build_info()
    assert set(info) >= {"native", "cuda", "openmp"}
    if info["native"]:
        assert info["version"] == fastft.__version__
        assert "compiler" in info


def test_disable_native_env_gives_reference_path_without_warning():
    out = run_python(
        """
        import warnings; warnings.simplefilter("error")
        import fastft, json
        print(json.dumps({"native": fastft.has_native(), "info": fastft.build_info()}))
        """,
        FASTFT_DISABLE_NATIVE="1",
    )
    result = json.loads(out.strip().splitlines()[0])
    assert result["native"] is False
    assert "FASTFT_DISABLE_NATIVE" in result["info"]["reason"]


def test_missing_native_module_warns_once_and_falls_back():
    out = run_python(
        """
        import sys, warnings
        sys.modules["fastft._C"] = None   # makes `import fastft._C` fail like a missing build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastft, torch
            fastft.has_native(); fastft.build_info(); fastft.has_cuda()
            out = torch.ops.fastft.cache_gather(
                torch.ones(3, 2), torch.empty(0), torch.tensor([2]), torch.float16
            )
        msgs = [str(w.message) for w in caught if "fastft._C" in str(w.message)]
        print(len(msgs), fastft.has_native(), out.tolist())
        """
    )
    first = out.strip().splitlines()[0]
    assert first == "1 False [[1.0, 1.0]]", out


# ------------------------------------------------- the native path runs natively, and agrees
# The same calls run three ways in subprocesses: native, FASTFT_DISABLE_NATIVE=1 (the
# reference), and native with a deliberately wrong kernel (src + 1e-2) registered over the
# CPU one. Each run reports which implementation served its calls (fastft.ops.backend_calls).
SAME_CALLS = """
    import sys, torch, fastft
    from fastft.ops import cpu
    g = torch.Generator().manual_seed(3)
    src = torch.randn(6, 2048, 7, 7, generator=g).flatten(2).transpose(1, 2)
    if sys.argv[2] == "wrong":  # a kernel that is off by 1e-2, still reported as "cpu"
        # fastft._C's entry point is wrapped (torch 2.11 refuses a second Python kernel for
        # the same op and device): it reads src + 1e-2, laid out as src, instead of src.
        shifted, native = src + 1e-2, cpu._C
        assert shifted.stride() == src.stride()
        class Off:
            def __getattr__(self, name):
                return getattr(native, name)
            def cache_write_cpu(self, **kw):
                assert kw["src_ptr"] == src.data_ptr()
                return native.cache_write_cpu(**{**kw, "src_ptr": shifted.data_ptr()})
        cpu._C = Off()
    fastft.ops.backend_calls(reset=True)
    res = {}
    for storage in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        for pool in ("first", "max", "mean"):
            dst = torch.zeros(10, 2048, dtype=storage); sc = torch.zeros(10)
            torch.ops.fastft.cache_write(src, torch.tensor(ROWS), dst, sc, pool)
            res[f"{storage}-{pool}"] = (dst, sc)
            res[f"{storage}-{pool}-gather"] = torch.ops.fastft.cache_gather(
                dst, sc, torch.tensor(GATHER_ROWS), torch.bfloat16)
    torch.save({"src": src, "res": res, "calls": fastft.ops.backend_calls()}, sys.argv[1])
"""
ROWS, GATHER_ROWS = [9, 0, 3, 4, 5, 1], [1, 1, 9]
U32 = 2.0**-24  # unit roundoff of float32


def run_same_calls(tmp_path, mode: str) -> dict:
    script = tmp_path / "same_calls.py"
    code = textwrap.dedent(SAME_CALLS).replace("GATHER_ROWS", repr(GATHER_ROWS))
    script.write_text(code.replace("ROWS", repr(ROWS)))
    target = tmp_path / f"{mode}.pt"
    env = clean_env(FASTFT_DISABLE_NATIVE="1" if mode == "reference" else "0")
    subprocess.run(
        [sys.executable, str(script), str(target), mode], env=env, check=True, timeout=120
    )
    return torch.load(target)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at ``|x|``: one unit in the last place."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))) * info.eps


def within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor) -> bool:
    return bool(((got - want).abs() <= tol).all())


def mean_write_agrees(got, want, bound: torch.Tensor) -> bool:
    """Whether a mean-pooled write (dst, scales) is as close to the reference as rounding allows.

    Two float32 means of the same L values, summed in other orders, differ by at most
    ``bound`` = 2 (L - 1) u mean|x| (u = 2^-24), plus one float32 ulp for the division;
    casting both to the storage dtype adds one of its ulps (at most 2^-7 of the magnitude in
    bf16, 2^-10 in fp16); an int8 value adds one quantization step (its row's scale).
    """
    (dst, scales), (ref, ref_scales) = got, want
    if ref.dtype == torch.int8:
        scale_tol = bound.amax(dim=1) / 127 + ulp(ref_scales, torch.float32)
        if not within(scales, ref_scales, scale_tol):
            return False
        values, ref_values = dst.float() * scales[:, None], ref.float() * ref_scales[:, None]
        cast = ref_scales[:, None]
    else:
        values, ref_values = dst.float(), ref.float()
        cast = torch.maximum(ulp(values, ref.dtype), ulp(ref_values, ref.dtype))
    return within(values, ref_values, bound + ulp(ref_values, torch.float32) + cast)


def mean_gather_agrees(got, want, storage, bound, ref_scales) -> bool:
    """A bf16 gather of mean-pooled rows: the write's tolerance, plus one bf16 ulp."""
    values, ref_values = got.float(), want.float()
    cast = ref_scales[:, None] if storage == torch.int8 else ulp(ref_values, storage)
    read = torch.maximum(ulp(values, torch.bfloat16), ulp(ref_values, torch.bfloat16))
    return within(values, ref_values, bound + ulp(ref_values, torch.float32) + cast + read)


def disagreements(results: dict, reference: dict, src: torch.Tensor) -> list[str]:
    """The results (by key) that differ from the reference's by more than rounding allows:
    first and max must be equal, means within :func:`mean_write_agrees`' tolerance."""
    B, L, D = src.shape
    bound = torch.zeros(10, D)
    bound[ROWS] = 2 * (L - 1) * U32 * src.abs().mean(dim=1)
    storages = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.int8)}
    bad = []
    for key, want in reference.items():
        got = results[key]
        storage_name, pool, *gather = key.split("-")
        if pool != "mean":
            agree = all(map(torch.equal, got, want)) if gather == [] else torch.equal(got, want)
        elif not gather:
            agree = mean_write_agrees(got, want, bound)
        else:
            ref_scales = reference[f"{storage_name}-{pool}"][1][GATHER_ROWS]
            storage = storages[storage_name]
            agree = mean_gather_agrees(got, want, storage, bound[GATHER_ROWS], ref_scales)
        if not agree:
            bad.append(key)
    return bad


@needs_native
def test_native_run_uses_the_native_kernels_and_agrees_with_the_reference(tmp_path):
    """The native run is served by fastft._C (not the reference compared with itself), the
    disabled run by the reference, and their answers agree as exactly as the dtypes allow:
    tight enough that a kernel off by 1e-2 fails on every result."""
    runs = {mode: run_same_calls(tmp_path, mode) for mode in ("native", "reference", "wrong")}
    n_calls = 12  # 4 storage dtypes x 3 pools, one write and one gather each
    for mode, backend in [("native", "cpu"), ("reference", "reference"), ("wrong", "cpu")]:
        assert runs[mode]["calls"] == {
            ("cache_write", backend): n_calls,
            ("cache_gather", backend): n_calls,
        }, mode
    reference, src = runs["reference"]["res"], runs["reference"]["src"]
    assert torch.equal(runs["native"]["src"], src)
    assert disagreements(runs["native"]["res"], reference, src) == []
    assert sorted(disagreements(runs["wrong"]["res"], reference, src)) == sorted(reference)


def test_backend_calls_counts_the_implementation_that_served_each_call():
    from fastft.ops import reference

    fastft.ops.backend_calls(reset=True)
    cache = torch.arange(6.0).reshape(3, 2)
    assert fastft.ops.cache_gather(cache, torch.empty(0), torch.tensor([2])).tolist() == [[4, 5]]
    reference.cache_gather(cache, torch.empty(0), torch.tensor([0]), torch.float32)
    with pytest.raises(fastft.FastFTValueError):  # rejected by the argument checks: not served
        fastft.ops.cache_write(torch.ones(2, 2), torch.tensor([0, 1]), cache, torch.empty(0))
    calls = fastft.ops.backend_calls(reset=True)
    if fastft.has_native():
        assert calls == {("cache_gather", "cpu"): 1, ("cache_gather", "reference"): 1}
    else:
        assert calls == {("cache_gather", "reference"): 2}
    assert fastft.ops.backend_calls() == {}  # reset cleared them
    assert set(fastft.ops.BACKENDS) == {"reference", "cpu", "cuda"}


# --------------------------------------------------------------- mismatch and FASTFT_REQUIRE_NATIVE
# In-process tests load afresh: they clear the loader's cache, patch what it sees, and clear
# it again so that later tests load the real module. fastft.ops keeps the module it got at
# import, so the kernels other tests use are unaffected.


@pytest.fixture
def fresh_load(monkeypatch):
    """Run fastft._native's loader afresh, without FASTFT_REQUIRE/DISABLE_NATIVE from outside."""
    from fastft import _native

    monkeypatch.delenv("FASTFT_REQUIRE_NATIVE", raising=False)
    monkeypatch.delenv("FASTFT_DISABLE_NATIVE", raising=False)
    _native._load.cache_clear()
    yield _native
    _native._load.cache_clear()


def real_module():
    return importlib.import_module("fastft._C")


def mismatched_codes(_native):
    """The module's codes with pool 'max' renumbered, as a build from other sources has them."""
    codes = {table: dict(names) for table, names in _native.NATIVE_CODES.items()}
    codes["pools"]["max"] = 7
    return codes


@needs_native
def test_mismatched_module_warns_once_and_falls_back(fresh_load, monkeypatch):
    monkeypatch.setattr(real_module(), "codes", lambda: mismatched_codes(fresh_load))
    with pytest.warns(RuntimeWarning) as caught:
        assert fastft.has_native() is False
        info = fastft.build_info()
        assert fresh_load.native_module() is None and fastft.has_cuda() is False
    msgs = [str(w.message) for w in caught if "fastft._C" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "does not match this fastft Python code" in msgs[0]
    assert "pools['max'] is 2 here but 7 in fastft._C" in msgs[0]
    assert "pip install -e ." in msgs[0] and "pure-PyTorch" in msgs[0]
    assert info["native"] is False
    assert info["reason"].startswith("NativeMismatchError: ") and "pools['max']" in info["reason"]


@needs_native
def test_module_without_codes_is_a_mismatch(fresh_load, monkeypatch):
    monkeypatch.delattr(real_module(), "codes")
    with pytest.warns(RuntimeWarning, match="no codes"):
        info = fastft.build_info()
    assert info["native"] is False and info["reason"].startswith("NativeMismatchError")


def test_missing_module_reason_and_rebuild_hint(fresh_load, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastft._C", None)
    with pytest.warns(RuntimeWarning, match=r"could not be loaded .*pip install -e \."):
        info = fastft.build_info()
    assert info["native"] is False and info["reason"].startswith("ModuleNotFoundError: ")


def test_require_native_raises_when_the_module_is_missing(fresh_load, monkeypatch):
    monkeypatch.setenv("FASTFT_REQUIRE_NATIVE", "1")
    monkeypatch.setitem(
        sys.modules, "fastft._C", None
    )  # `import fastft._C` fails like a missing build
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raises instead of warning
        with pytest.raises(fastft.NativeUnavailableError, match="could not be loaded") as info:
            fastft.has_native()
    assert not isinstance(info.value, fastft.NativeMismatchError)
    assert "pip install -e ." in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


@needs_native
def test_require_native_raises_on_a_mismatch(fresh_load, monkeypatch):
    monkeypatch.setenv("FASTFT_REQUIRE_NATIVE", "1")
    monkeypatch.setattr(real_module(), "codes", lambda: mismatched_codes(fresh_load))
    with pytest.raises(fastft.NativeMismatchError, match=r"pools\['max'\] is 2 here but 7") as info:
        fastft.build_info()
    assert isinstance(info.value, fastft.NativeUnavailableError)
    assert "pip install -e ." in str(info.value)


def test_require_native_contradicting_disable_native_raises(fresh_load, monkeypatch):
    monkeypatch.setenv("FASTFT_REQUIRE_NATIVE", "1")
    monkeypatch.setenv("FASTFT_DISABLE_NATIVE", "1")
    with pytest.raises(fastft.NativeUnavailableError, match="unset one of them"):
        fastft.has_native()


@needs_native
def test_require_native_with_a_matching_module_loads_quietly(fresh_load, monkeypatch):
    monkeypatch.setenv("FASTFT_REQUIRE_NATIVE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastft.has_native() is True
        assert fastft.build_info()["native"] is True


def test_require_native_makes_import_fail_without_the_module():
    """End to end: with FASTFT_REQUIRE_NATIVE=1, `import fastft` itself raises."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["fastft._C"] = None
        try:
            import fastft
        except Exception as exc:
            from fastft.errors import NativeUnavailableError
            print(type(exc).__name__, isinstance(exc, NativeUnavailableError))
        else:
            print("imported")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(FASTFT_REQUIRE_NATIVE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip().splitlines()[-1] == "NativeUnavailableError True", (
        out.stdout + out.stderr
    )


@needs_native
def test_mismatched_module_at_import_gives_reference_answers():
    """End to end: a fastft._C with other codes is never called; the reference answers."""
    path = importlib.util.find_spec("fastft._C").origin
    out = run_python(
        f"""
        import importlib.util, sys, warnings
        spec = importlib.util.spec_from_file_location("fastft._C", {path!r})
        C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
        real = C.codes()
        C.codes = lambda: {{**real, "dtypes": {{**real["dtypes"], "float16": 2, "bfloat16": 1}}}}
        sys.modules["fastft._C"] = C
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastft, torch
            out = torch.ops.fastft.cache_gather(
                torch.ones(3, 2), torch.empty(0), torch.tensor([2]), torch.float16
            )
        msgs = [str(w.message) for w in caught if "fastft._C" in str(w.message)]
        print(len(msgs), fastft.has_native(), out.dtype, out.tolist())
        print(fastft.build_info()["reason"])
        """
    )
    lines = out.strip().splitlines()
    assert lines[0] == "1 False torch.float16 [[1.0, 1.0]]", out
    assert (
        lines[1].startswith("NativeMismatchError: ")
        and "dtypes['bfloat16'] is 2 here but 1" in lines[1]
    ), out
