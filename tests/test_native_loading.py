"""Loading the native module: a missing one warns once and never breaks ``import fastft``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastft


def run_python(code: str, **env) -> str:
    full_env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env, capture_output=True, text=True, timeout=120,
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
            out = torch.ops.fastft.cache_gather(torch.ones(3, 2), torch.empty(0), torch.tensor([2]), torch.float16)
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
        env = {**os.environ, "FASTFT_DISABLE_NATIVE": flag}
        subprocess.run([sys.executable, str(path_script), str(target)], env=env, check=True, timeout=120)
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
