"""Whether the native build the tests exercise is there: one decision for the whole suite.

A broken build must not give a green suite. Without ``fastft._C`` every op quietly runs
its pure-PyTorch reference, so the kernel tests would skip and the rest would pass. Instead:

- :func:`native_failure` is the session check of ``tests/conftest.py``: when the native
  module is missing, broken or mismatched, the run stops with a failure that says why
  (``fastft.build_info()["reason"]``, the load error) and how to opt out.
- Opting out is explicit: ``FASTFT_ALLOW_NO_NATIVE=1`` (test the reference alone), or
  ``FASTFT_DISABLE_NATIVE=1``, which already means "use the reference". Tests of the native
  kernels then skip through :data:`needs_native`.
- :func:`cuda_verdict` decides for the tests of fastft's CUDA kernels (the
  ``cuda_kernels`` marker, which conftest turns into a skip or a failure): they run with a
  GPU and a CUDA build, skip without a GPU, and *fail* where a GPU and nvcc are both
  present but ``fastft._C`` was built without CUDA (the build should have found nvcc),
  unless opted out as above.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

ALLOW_ENV = "FASTFT_ALLOW_NO_NATIVE"
DISABLE_ENV = "FASTFT_DISABLE_NATIVE"
_TRUE = {"1", "true", "yes", "on"}
_REBUILD = (
    "Rebuild it with `pip install -e .` (or `make setup`; it needs a C++17 compiler and "
    "CMake, and pip's output shows where the build fails)"
)
_OPT_OUT = (
    f"To run the tests on the pure-PyTorch reference alone, set {ALLOW_ENV}=1 (or {DISABLE_ENV}=1)."
)


def opted_out() -> str | None:
    """The variable that allows testing without native kernels (None when none is set)."""
    for name in (ALLOW_ENV, DISABLE_ENV):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}=1"
    return None


def native_failure() -> str | None:
    """Why this run must fail for want of ``fastft._C``; None when it is loaded or opted out."""
    if opted_out():
        return None
    from fastft.errors import NativeUnavailableError

    try:
        import fastft

        if fastft.has_native():
            return None
        info = fastft.build_info()
    except NativeUnavailableError as exc:  # FASTFT_REQUIRE_NATIVE=1 turns the fallback into this
        info = {"native": False, "reason": f"{type(exc).__name__}: {exc}"}
    return (
        "fastft's native extension fastft._C is not in use, so its kernels would go untested "
        f"and the suite would pass on the reference alone. Load error: {info.get('reason')}. "
        f"fastft.build_info() = {json.dumps(info)}. {_REBUILD}. {_OPT_OUT}"
    )


def _has_native() -> bool:
    from fastft.errors import NativeUnavailableError

    try:
        import fastft

        return fastft.has_native()
    except NativeUnavailableError:  # FASTFT_REQUIRE_NATIVE=1; the session check reports it
        return False


#: For tests of fastft._C itself: they skip only where the run opted out of the native
#: module (without the opt-out, the session check has already failed the run).
needs_native = pytest.mark.skipif(
    not _has_native(),
    reason=f"fastft._C is not in use, allowed by {opted_out() or 'an opt-out'}",
)


def find_nvcc() -> str | None:
    """The nvcc that fastft's CMake build would use: $CUDACXX, PATH, or /usr/local/cuda."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def built_with_cuda() -> bool:
    """Whether the fastft._C in use carries CUDA kernels (says nothing of a GPU)."""
    from fastft.ops import cuda

    return cuda.BUILT_WITH_CUDA


def cuda_runtime_error() -> str | None:
    """Why the CUDA runtime inside fastft._C cannot run here (None when it can)."""
    from fastft._native import cuda_runtime_error as error

    return error()


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_verdict(device: bool = True) -> tuple[str, str]:
    """("run" | "skip" | "fail", why) for a test of fastft's CUDA kernels.

    ``device=False`` is for tests of the CUDA build alone, which need no GPU. Either way a
    machine with a GPU and nvcc whose fastft._C lacks the CUDA kernels fails the test:
    CMake builds them wherever it finds nvcc, so their absence there is a broken build.
    """
    gpu = gpu_available()
    if device and not gpu:
        return "skip", "needs a CUDA device"
    if built_with_cuda():
        error = cuda_runtime_error() if gpu else None
        if error:  # the kernels would fall back to the reference: tests of them must not pass
            return "fail", (
                f"fastft._C's CUDA kernels cannot run on this GPU: {error} The CUDA tests "
                "would only test the pure-PyTorch reference."
            )
        return "run", ""
    why = "fastft._C was built without its CUDA kernels"
    nvcc = find_nvcc()
    allowed = opted_out()
    if not gpu or nvcc is None or allowed:
        because = "no CUDA device" if not gpu else "no nvcc here" if nvcc is None else allowed
        return "skip", f"{why} ({because})"
    import fastft

    return "fail", (
        f"{why}, although this machine has a CUDA device and nvcc ({nvcc}), so the CUDA "
        f"kernels would go untested. fastft.build_info() = {json.dumps(fastft.build_info())}. "
        f"{_REBUILD}; FASTFT_CUDA=ON makes a build without nvcc an error. {_OPT_OUT}"
    )


#: For tests of fastft's CUDA kernels: ``@needs_cuda_kernels`` (see :func:`cuda_verdict`).
needs_cuda_kernels = pytest.mark.cuda_kernels(device=True)
#: For tests of the CUDA build that need no GPU.
needs_cuda_build = pytest.mark.cuda_kernels(device=False)
#: For tests that need a CUDA device but none of fastft's CUDA kernels (the reference on CUDA).
needs_cuda_device = pytest.mark.skipif(not gpu_available(), reason="needs a CUDA device")
