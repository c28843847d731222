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


def test_disabled_native_gives_the_same_answers(tmp_path):
    """The same calls with and without FASTFT_DISABLE_NATIVE=1 give the same tensors."""
    script = """
        import sys, torch, fastft
        g = torch.Generator().manual_seed(3)
        src = torch.randn(6, 2048, 7, 7, generator=g).flatten(2).transpose(1, 2)
        res = {}
        for storage in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            for pool in ("first", "max", "mean"):
                dst = torch.zeros(10, 2048, dtype=storage); sc = torch.zeros(10)
                torch.ops.fastft.cache_write(src, torch.tensor([9, 0, 3, 4, 5, 1]), dst, sc, pool)
                res[f"{storage}-{pool}"] = (dst, sc)
                res[f"{storage}-{pool}-gather"] = torch.ops.fastft.cache_gather(
                    dst, sc, torch.tensor([1, 1, 9]), torch.bfloat16)
        torch.save(res, sys.argv[1])
    """
    path_script = tmp_path / "s.py"
    path_script.write_text(textwrap.dedent(script))
    outs = {}
    for flag in ("0", "1"):
        target = tmp_path / f"out{flag}.pt"
        env = clean_env(FASTFT_DISABLE_NATIVE=flag)
        subprocess.run(
            [sys.executable, str(path_script), str(target)], env=env, check=True, timeout=120
        )
        outs[flag] = torch.load(target)
    for key, ref in outs["1"].items():
        nat = outs["0"][key]
        if "mean" in key:  # rounding of the mean may differ by one ulp before the cast
            ref_t = ref[0] if isinstance(ref, tuple) else ref
            nat_t = nat[0] if isinstance(nat, tuple) else nat
            assert (nat_t.float() - ref_t.float()).abs().max() <= 1.01, key
            continue
        if isinstance(ref, tuple):
            assert torch.equal(nat[0], ref[0]) and torch.equal(nat[1], ref[1]), key
        else:
            assert torch.equal(nat, ref), key


# --------------------------------------------------------------- mismatch and FASTFT_REQUIRE_NATIVE
# In-process tests load afresh: they clear the loader's cache, patch what it sees, and clear
# it again so that later tests load the real module. fastft.ops keeps the module it got at
# import, so the kernels other tests use are unaffected.

needs_native = pytest.mark.skipif(not fastft.has_native(), reason="native module not built")


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
