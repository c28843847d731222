"""A broken native build must not give a green suite (tests/conftest.py, helpers.native).

A small pytest run in a subprocess, with the repository's conftest loaded as a plugin and
``fastft._C`` made unloadable by a meta-path blocker, must fail and say why and how to opt
out; with ``FASTFT_ALLOW_NO_NATIVE=1`` or ``FASTFT_DISABLE_NATIVE=1`` it passes, the native
test skipped. The CUDA decision is checked on its inputs (GPU, nvcc, build, opt-out).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import native
from helpers.native import needs_native

TESTS = Path(__file__).resolve().parent
_OUTER = ("FASTFT_ALLOW_NO_NATIVE", "FASTFT_DISABLE_NATIVE", "FASTFT_REQUIRE_NATIVE")

TINY_TEST = """
    from helpers.native import needs_cuda_kernels, needs_native

    def test_without_native_code():
        assert 1 + 1 == 2

    @needs_native
    def test_native_kernels():
        import fastft
        assert fastft.has_native()

    @needs_cuda_kernels
    def test_cuda_kernels():
        import fastft
        assert fastft.has_cuda()
"""

# Runs pytest with `import fastft._C` failing as it does for a build that broke (BLOCK), or
# on what looks like a machine with a GPU and nvcc whose fastft._C lacks CUDA (CUDA_GAP).
RUNNER = """
    import sys

    if CUDA_GAP:
        import helpers.native

        helpers.native.gpu_available = lambda: True
        helpers.native.built_with_cuda = lambda: False
        helpers.native.find_nvcc = lambda: "/opt/cuda/bin/nvcc"

    class BrokenBuild:
        def find_spec(self, name, path=None, target=None):
            if name == "fastft._C" and BLOCK:
                raise ImportError("simulated broken build of fastft._C")
            return None

    sys.meta_path.insert(0, BrokenBuild())
    import pytest

    raise SystemExit(pytest.main(sys.argv[1:]))
"""


def run_tiny_suite(
    tmp_path: Path, block: bool = False, cuda_gap: bool = False, **env: str
) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent(TINY_TEST))
    runner = tmp_path / "runner.py"
    code = textwrap.dedent(RUNNER).replace("BLOCK", repr(block))
    runner.write_text(code.replace("CUDA_GAP", repr(cuda_gap)))
    full_env = {k: v for k, v in os.environ.items() if k not in _OUTER and k != "PYTEST_ADDOPTS"}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, str(runner), "-p", "conftest", "-p", "no:cacheprovider", "-v", "-rs"]
        + ["test_tiny.py"],
        cwd=tmp_path,
        env={**full_env, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_broken_native_build_fails_the_run_and_says_why(tmp_path):
    out = run_tiny_suite(tmp_path, block=True)
    text = out.stdout + out.stderr
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "fastft._C is not in use" in text
    assert "simulated broken build of fastft._C" in text  # the load error
    assert "pip install -e ." in text
    assert "FASTFT_ALLOW_NO_NATIVE=1" in text and "FASTFT_DISABLE_NATIVE=1" in text
    assert "passed" not in text  # stopped before any test


@pytest.mark.parametrize("opt_out", ["FASTFT_ALLOW_NO_NATIVE", "FASTFT_DISABLE_NATIVE"])
def test_a_broken_native_build_is_allowed_by_an_explicit_opt_out(tmp_path, opt_out):
    out = run_tiny_suite(tmp_path, block=True, **{opt_out: "1"})
    text = out.stdout + out.stderr
    assert out.returncode == pytest.ExitCode.OK, text
    assert "test_tiny.py::test_without_native_code PASSED" in text
    assert "test_tiny.py::test_native_kernels SKIPPED" in text
    assert "test_tiny.py::test_cuda_kernels SKIPPED" in text
    assert f"allowed by {opt_out}=1" in text  # the skip reason names the opt-out


@needs_native
def test_a_working_native_build_runs_the_native_tests(tmp_path):
    out = run_tiny_suite(tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == pytest.ExitCode.OK, text
    assert "test_tiny.py::test_without_native_code PASSED" in text
    assert "test_tiny.py::test_native_kernels PASSED" in text
    cuda = "PASSED" if native.cuda_verdict()[0] == "run" else "SKIPPED"
    assert f"test_tiny.py::test_cuda_kernels {cuda}" in text


@needs_native
def test_a_gpu_with_nvcc_but_no_cuda_build_fails_the_cuda_tests(tmp_path):
    out = run_tiny_suite(tmp_path, cuda_gap=True)
    text = out.stdout + out.stderr
    assert out.returncode == pytest.ExitCode.TESTS_FAILED, text
    assert "test_tiny.py::test_native_kernels PASSED" in text
    assert "test_tiny.py::test_cuda_kernels ERROR" in text  # failed at set-up, not skipped
    assert "built without its CUDA kernels" in text and "/opt/cuda/bin/nvcc" in text
    assert "FASTFT_ALLOW_NO_NATIVE=1" in text

    allowed = run_tiny_suite(tmp_path, cuda_gap=True, FASTFT_ALLOW_NO_NATIVE="1")
    text = allowed.stdout + allowed.stderr
    assert allowed.returncode == pytest.ExitCode.OK, text
    assert "test_tiny.py::test_cuda_kernels SKIPPED" in text


# ---------------------------------------------------------------- the check, in process


@pytest.fixture
def no_opt_out(monkeypatch):
    for name in _OUTER:
        monkeypatch.delenv(name, raising=False)


def test_native_failure_reports_the_load_error(no_opt_out, monkeypatch):
    import fastft

    monkeypatch.setattr(fastft, "has_native", lambda: False)
    monkeypatch.setattr(
        fastft, "build_info", lambda: {"native": False, "reason": "OSError: libgomp.so.1"}
    )
    message = native.native_failure()
    assert message is not None and "Load error: OSError: libgomp.so.1" in message
    monkeypatch.setenv("FASTFT_ALLOW_NO_NATIVE", "yes")
    assert native.native_failure() is None


def test_native_failure_reports_a_required_native_that_is_missing(no_opt_out, monkeypatch):
    import fastft

    def refuse():
        raise fastft.NativeUnavailableError("the native extension fastft._C could not be loaded")

    monkeypatch.setattr(fastft, "has_native", refuse)
    message = native.native_failure()
    assert message is not None
    assert "NativeUnavailableError: the native extension fastft._C could not be loaded" in message


@needs_native
def test_native_failure_is_none_with_the_module_loaded(no_opt_out):
    assert native.native_failure() is None


@pytest.mark.parametrize(
    "gpu, built, nvcc, opt_out, device, verdict",
    [
        (False, False, True, None, True, "skip"),  # no GPU: nothing to run the kernels on
        (True, True, True, None, True, "run"),
        (True, True, True, "runtime", True, "fail"),  # a driver older than fastft's runtime
        (True, True, True, "runtime", False, "fail"),
        (False, True, False, None, False, "run"),  # the build alone: no GPU needed
        (True, False, True, None, True, "fail"),  # GPU and nvcc, but no CUDA kernels built
        (True, False, True, None, False, "fail"),
        (True, False, False, None, True, "skip"),  # no nvcc: the build could not have them
        (False, False, True, None, False, "skip"),  # no GPU: the promise is GPU and nvcc
        (True, False, True, "FASTFT_ALLOW_NO_NATIVE", True, "skip"),
        (True, False, True, "FASTFT_DISABLE_NATIVE", True, "skip"),
    ],
)
def test_cuda_verdict(no_opt_out, monkeypatch, gpu, built, nvcc, opt_out, device, verdict):
    monkeypatch.setattr(native, "gpu_available", lambda: gpu)
    monkeypatch.setattr(native, "built_with_cuda", lambda: built)
    monkeypatch.setattr(native, "find_nvcc", lambda: "/opt/cuda/bin/nvcc" if nvcc else None)
    runtime = "cudaErrorInsufficientDriver: CUDA driver version is insufficient"
    monkeypatch.setattr(
        native, "cuda_runtime_error", lambda: runtime if opt_out == "runtime" else None
    )
    if opt_out and opt_out != "runtime":
        monkeypatch.setenv(opt_out, "1")
    got, why = native.cuda_verdict(device=device)
    assert got == verdict, why
    if opt_out == "runtime":
        assert runtime in why and "only test the pure-PyTorch reference" in why
    elif verdict == "fail":
        assert "built without its CUDA kernels" in why and "/opt/cuda/bin/nvcc" in why
        assert "FASTFT_ALLOW_NO_NATIVE=1" in why and "pip install -e ." in why
    if verdict == "skip" and opt_out and opt_out != "runtime":
        assert f"{opt_out}=1" in why


def test_find_nvcc_follows_cudacxx(monkeypatch, tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDACXX", str(fake))
    assert native.find_nvcc() == str(fake)
    fake.chmod(0o644)  # not executable: not a compiler CMake could run
    assert native.find_nvcc() != str(fake)
