"""What the first run on a GPU would otherwise find (issue 23), checked on the CPU: NaN/Inf
rows in int8 caches, masked positions holding NaN, which duplicate row an error names, when
``has_cuda()`` may say yes, per-thread deferred row checks, and the pinned host budget.

The CUDA kernels' side of each is in tests/test_ops_cuda.py (needs a GPU)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastft
from fastft import _native
from fastft.cache import FeatureCache, layout
from fastft.errors import CacheTooLargeError, DataError
from fastft.ops import _codes, reference
from fastft.ops import cpu as fcpu
from fastft.ops import cuda as fcuda

from helpers.native import needs_native

NAN, INF = float("nan"), float("inf")


def nonfinite_batch() -> torch.Tensor:
    """[5, 3, 8]: a clean row, a NaN, +Inf, -Inf (at other positions) and an all-zero row."""
    g = torch.Generator().manual_seed(3)
    src = torch.randn(5, 3, 8, generator=g)
    src[1, 1, 2] = NAN
    src[2, 0, 5] = INF
    src[3, 2, 7] = -INF
    src[4] = 0.0
    return src


def write_both(src, pool, dtype, mask=None):
    """(dst, scales) after the native CPU kernel and after the reference, same arguments."""
    out = []
    for write in (fcpu.cache_write, reference.cache_write):
        dst, scales = torch.zeros(7, src.shape[2], dtype=dtype), torch.zeros(7)
        write(src, torch.tensor([6, 0, 3, 1, 5]), dst, scales, pool, mask)
        out.append((dst, scales))
    return out


@needs_native
@pytest.mark.parametrize("pool", ["none", "first", "mean", "max", "masked_mean"])
def test_int8_rows_with_nan_or_inf_match_the_reference(pool):
    src = nonfinite_batch()
    if pool in ("none", "first"):  # they read position 0 only: put the bad values there
        src[1, 0, 2], src[3, 0, 7] = NAN, -INF
        src = src[:, :1] if pool == "none" else src
    mask = torch.ones(5, 3, dtype=torch.bool) if pool == "masked_mean" else None
    (dst, scales), (ref_dst, ref_scales) = write_both(src, pool, torch.int8, mask)
    bad = [0, 3, 1, 5]  # the NaN, +Inf, -Inf and all-zero samples' rows: exactly as the reference
    assert torch.equal(dst[bad], ref_dst[bad])
    torch.testing.assert_close(scales[bad], ref_scales[bad], rtol=0, atol=0, equal_nan=True)
    # The clean row: a float32 mean (reference) and a double one (kernel) may differ in the
    # last bit of the scale, and so a value by one step.
    torch.testing.assert_close(scales[6], ref_scales[6], rtol=1e-6, atol=0)
    assert (dst[6].int() - ref_dst[6].int()).abs().max() <= 1
    assert torch.isnan(scales[0])  # the NaN row (rows[1] = 0): a NaN scale, and 0s stored
    assert torch.equal(dst[0], torch.zeros(8, dtype=torch.int8))
    assert torch.isinf(scales[3]) and torch.equal(dst[3], dst[0])  # +Inf: Inf scale, 0s
    assert torch.isinf(scales[1]) or pool == "max"  # -Inf survives every pool but max
    assert scales[5] == 0 and torch.isfinite(scales[6]) and scales[6] > 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_rows_with_nan_or_inf_match_the_reference(dtype):
    (dst, _), (ref_dst, _) = write_both(nonfinite_batch(), "max", dtype)
    torch.testing.assert_close(dst, ref_dst, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(dst[0]).any() and torch.isinf(dst[3]).any()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_masked_positions_holding_nan_or_inf_do_not_change_the_result(dtype):
    g = torch.Generator().manual_seed(5)
    src = torch.randn(5, 6, 8, generator=g)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, 4:] = False  # padding: garbage there must not matter
    mask[3] = False  # a fully masked sample pools to 0
    clean = write_both(src.clone(), "masked_mean", dtype, mask)
    src[:, 4, :], src[:2, 5, 0], src[3, 0, 0] = NAN, INF, -INF
    dirty = write_both(src, "masked_mean", dtype, mask)
    for (dst, scales), (clean_dst, clean_scales) in zip(dirty, clean):
        assert torch.equal(dst, clean_dst) and torch.equal(scales, clean_scales)
        assert torch.isfinite(dst.float()).all() and torch.isfinite(scales).all()
    # Kernel and reference agree (a double and a float32 mean: last bit, or one int8 step).
    step = 1.0 if dtype == torch.int8 else 1e-6
    torch.testing.assert_close(dirty[0][0].float(), dirty[1][0].float(), rtol=1e-6, atol=step)


@pytest.mark.parametrize(
    "rows,index,value",
    [([7, 2, 7, 2], 2, 7), ([2, 7, 7, 2], 2, 7), ([5, 1, 3, 1, 5], 3, 1), ([4, 4], 1, 4)],
)
def test_a_duplicate_names_the_first_repeat_in_order(rows, index, value):
    impls = [reference.cache_write] + ([fcpu.cache_write] if fastft.has_native() else [])
    words = rf"row {value} appears more than once.*rows\[{index}\]"
    for write in impls:
        dst = torch.zeros(10, 4)
        with pytest.raises(fastft.FastFTIndexError, match=words):
            write(torch.ones(len(rows), 1, 4), torch.tensor(rows), dst, torch.zeros(10), "none")
        assert not dst.any()
    # The CUDA kernel leaves (duplicate kind << shift) | first repeat; decoding names the same.
    with pytest.raises(fastft.FastFTIndexError, match=words):
        fcuda._raise_verdict("cache_write", (1 << _codes.ROW_KIND_SHIFT) | index, rows, 10)


# ---------------------------------------------------------------------------- the builder
class Spike(nn.Module):
    """Features of sample 5 are NaN or Inf (at one feature only)."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.lin = value, nn.Linear(6, 10)

    def forward(self, x):
        y = self.lin(x)
        bad = (x[:, 0] == 100.0).unsqueeze(1) & (torch.arange(10) == 3)
        return torch.where(bad, torch.full_like(y, self.value), y)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_every_cache_dtype_refuses_nan_or_inf_features(tmp_path, dtype, value):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    X[5, 0] = 100.0
    with pytest.raises(DataError, match="sample 5 .*NaN or Inf"):
        FeatureCache.build(
            Spike(value), (X, y), dtype=dtype, tier="host", cache_dir=tmp_path, progress=False
        )


# ---------------------------------------------------------------------------- has_cuda()
class FakeNative:
    """A fastft._C with CUDA kernels whose runtime reports ``error``."""

    def __init__(self, error: str = "", driver: int = 12080):
        self.error, self.driver = error, driver

    def build_info(self):
        return {"cuda": True, "cuda_archs": ["90"], "cuda_version": "13.0.88"}

    def cuda_runtime_info(self):
        return {
            "runtime_version": 13000,
            "driver_version": self.driver,
            "device_count": 0 if self.error else 1,
            "error": self.error,
        }


@pytest.fixture
def fake_native(monkeypatch):
    """Install a FakeNative (and a torch that sees a GPU) for the has_cuda() checks."""

    def install(module):
        _native.cuda_runtime_error.cache_clear()
        monkeypatch.setattr(_native, "_load", lambda: (module, None))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    yield install
    _native.cuda_runtime_error.cache_clear()


def test_a_runtime_that_cannot_run_means_no_cuda(fake_native):
    error = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime"
    fake_native(FakeNative(error, driver=12020))
    assert fastft.has_cuda() is False
    problem = fastft.build_info()["cuda_problem"]
    assert error in problem and "13000" in problem and "12020" in problem
    assert fastft.build_info()["cuda_runtime_error"] in problem
    fake_native(FakeNative("cudaErrorNoDevice: no CUDA-capable device is detected", driver=0))
    assert not fastft.has_cuda()
    assert "no CUDA driver is installed" in fastft.build_info()["cuda_problem"]


def test_a_runtime_that_runs_with_a_device_means_cuda(fake_native):
    fake_native(FakeNative(""))
    assert fastft.has_cuda() is True
    assert fastft.build_info()["cuda_problem"] is None


@needs_native
def test_here_has_cuda_is_false_and_says_why():
    """This machine: a CUDA build without a driver (or a CPU build), a CPU-only torch."""
    problem = fastft.build_info()["cuda_problem"]
    assert fastft.has_cuda() is False and problem
    if fcuda.BUILT_WITH_CUDA:
        error = _native.native_module().cuda_runtime_info()["error"]
        if error:  # no driver here: the runtime's own error is what the user reads
            assert error in problem and error in fcuda._runtime_problem()


# ---------------------------------------------------------------------------- deferred checks
class SlowEvent:
    """A finished CUDA event whose wait releases the GIL (as event.synchronize() does)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        time.sleep(0.001)


def test_deferred_verdicts_stay_with_their_thread(monkeypatch):
    """Each thread, in deferred mode, queues clean verdicts and one bad row of its own; at the
    block's end it must raise exactly its own error (a clean thread none), in any timing."""
    monkeypatch.setattr(fcuda, "_capturing", lambda device: False)
    monkeypatch.setattr(fcuda, "_copy_verdict", lambda scratch: (scratch[:1].clone(), SlowEvent()))
    threads_n, calls = 8, 30
    start = threading.Barrier(threads_n)
    seen: dict[int, list[str]] = {}

    def work(k: int) -> None:
        got = seen.setdefault(k, [])
        start.wait()
        for round_ in range(3):
            try:
                with fcuda.deferred_row_checks():
                    for j in range(calls):
                        bad = k % 2 == 0 and j == calls // 2
                        verdict = (_codes.ROW_KIND_OUT_OF_RANGE << _codes.ROW_KIND_SHIFT) | 0
                        scratch = torch.tensor([verdict if bad else _codes.ROWS_OK])
                        rows = torch.tensor([1000 + 10 * k + round_])
                        fcuda._report_rows("cache_gather", scratch, rows, 50)
            except fastft.FastFTIndexError as exc:
                got.append(str(exc))
                fcuda.raise_pending_errors()  # the calls after the bad one: all clean
            except Exception as exc:  # an IndexError from a raced queue, say
                got.append(f"{type(exc).__name__}: {exc}")
            if fcuda._pending():
                got.append("verdicts left in this thread's queue")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for k in range(threads_n):
        expected = (
            [f"rows[0] = {1000 + 10 * k + r} is outside" for r in range(3)] if k % 2 == 0 else []
        )
        assert len(seen[k]) == len(expected), (k, seen[k])
        for message, words in zip(seen[k], expected):
            assert words in message, (k, seen[k])


def test_a_thread_does_not_see_another_threads_queue(monkeypatch):
    monkeypatch.setattr(fcuda, "_capturing", lambda device: False)
    monkeypatch.setattr(fcuda, "_copy_verdict", lambda s: (s[:1].clone(), SlowEvent()))
    bad = torch.tensor([(_codes.ROW_KIND_OUT_OF_RANGE << _codes.ROW_KIND_SHIFT) | 0])
    old = fcuda.set_sync_checks(False)
    try:
        fcuda._report_rows("cache_gather", bad, torch.tensor([77]), 5)  # queued on this thread
        other: list[BaseException | None] = []

        def drain():
            try:
                fcuda.raise_pending_errors()
                other.append(None)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assert
                other.append(exc)

        t = threading.Thread(target=drain)
        t.start()
        t.join()
        assert other == [None]  # nothing of this thread's reached the other one
        with pytest.raises(fastft.FastFTIndexError, match=r"rows\[0\] = 77"):
            fcuda.raise_pending_errors()
    finally:
        fcuda.set_sync_checks(old)


# ---------------------------------------------------------------------------- pinned budget
@pytest.mark.parametrize(
    "nbytes,reserved",
    [(0, 0), (1, 1), (3, 4), (1000, 1024), (1024, 1024), (1025, 2048), (3 << 30, 4 << 30)],
)
def test_pinned_reserve_rounds_up_to_a_power_of_two(nbytes, reserved):
    assert layout.pinned_reserve(nbytes) == reserved


def tap(dim, dtype):
    return layout.TapInfo("t", dim, (dim,), dtype, "mean")


def test_pinned_overhead_counts_each_pinned_allocation():
    rows = 1000
    # fp16: one 1000 x 96 x 2 = 192000-byte allocation -> 262144 reserved.
    assert layout.pinned_overhead(rows, [tap(96, torch.float16)]) == 262144 - 192000
    # int8: data 1000 x 64 = 64000 -> 65536, scales 4000 -> 4096; two taps add up.
    int8 = (65536 - 64000) + (4096 - 4000)
    assert layout.pinned_overhead(rows, [tap(64, torch.int8)]) == int8
    assert layout.pinned_overhead(rows, [tap(64, torch.int8), tap(96, torch.float16)]) == (
        int8 + 262144 - 192000
    )
    assert layout.pinned_overhead(1024, [tap(64, torch.float32)]) == 0  # a power of two already


def test_the_pinned_host_tier_is_budgeted_by_what_it_reserves(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    taps = [tap(96, torch.float16)]
    nbytes, extra = 192000, layout.pinned_overhead(1000, taps)  # reserves 262144
    # auto on CUDA: the device tier is full, half of the free host memory is 200000 bytes.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1 << 30))
    monkeypatch.setattr(layout, "free_host_memory", lambda: 400000)
    assert layout.choose_tier("auto", nbytes, cuda, None, pin_extra=extra) == "disk"
    assert layout.choose_tier("auto", nbytes, cpu, None, pin_extra=extra) == "host"  # not pinned
    monkeypatch.setattr(layout, "free_host_memory", lambda: 600000)
    assert layout.choose_tier("auto", nbytes, cuda, None, pin_extra=extra) == "host"
    # An explicit host tier is refused by what it would pin.
    with pytest.raises(CacheTooLargeError, match="262,144 bytes"):
        layout.choose_tier("host", nbytes, cuda, 250000, pin_extra=extra)
    assert layout.choose_tier("host", nbytes, cpu, 250000, pin_extra=extra) == "host"


# ---------------------------------------------------------------------------- gpu_check.sh
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_ends_with_a_clear_verdict(tmp_path):
    """The dry run builds nothing; it records the versions and says whether fastft's CUDA
    kernels would run (here, without a GPU: they do not, exit 3)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["environment"]["python"] == platform.python_version()
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["kernels"]["has_cuda"] == fastft.has_cuda()
    assert f"VERDICT: {summary['verdict']}" in run.stdout
    if fastft.has_cuda():  # a GPU machine: the kernels would run
        assert run.returncode == 0 and summary["verdict"].startswith("dry run: fastft's CUDA")
        return
    assert run.returncode == 3, run.stdout[-2000:]
    problem = fastft.build_info()["cuda_problem"]
    assert summary["verdict"].startswith("no CUDA kernels running: ")
    assert (
        problem.rstrip(".") in summary["verdict"] and summary["kernels"]["cuda_problem"] == problem
    )
    assert [s["step"] for s in summary["steps"]][-2:] == ["build", "kernels"]
    assert summary["steps"][-2]["status"] == "skipped_dry_run"  # nothing was (re)installed
