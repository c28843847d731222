"""The host-side logic around fastft's CUDA kernels, checked on any machine: decoding the row
verdict and launch status the kernels leave, deferred row checks raising the first error in
call order, and the fallback when the CUDA runtime cannot run. (The kernels themselves are
in tests/test_ops_cuda.py and need a GPU.)"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch

import fastft
from fastft.ops import _codes
from fastft.ops import cuda as fcuda

OUT_OF_RANGE = _codes.ROW_KIND_OUT_OF_RANGE << _codes.ROW_KIND_SHIFT
DUPLICATE = 1 << _codes.ROW_KIND_SHIFT
assert _codes.ROW_KIND_OUT_OF_RANGE != 1  # the two kinds the verdicts above encode differ


class FakeEvent:
    """Stands for a torch.cuda.Event: done or not, and whether it was waited for."""

    def __init__(self, done: bool = True):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True


@pytest.fixture
def pending(monkeypatch):
    """An empty queue of this thread's deferred verdicts, put back as it was afterwards."""
    queue = collections.deque()
    monkeypatch.setattr(fcuda._thread, "pending", queue, raising=False)
    assert fcuda._pending() is queue
    return queue


def deferred(queue, op: str, verdict: int, rows: list[int], n: int, done: bool = True):
    event = FakeEvent(done)
    queue.append((op, n, torch.tensor(rows), torch.tensor([verdict]), event))
    return event


def test_a_clean_verdict_raises_nothing():
    fcuda._raise_verdict("cache_gather", _codes.ROWS_OK, torch.tensor([0, 1]), 5)


def test_an_out_of_range_verdict_names_the_row_and_its_index():
    with pytest.raises(fastft.FastFTIndexError, match=r"rows\[1\] = 9 is outside the cache's 5"):
        fcuda._raise_verdict("cache_gather", OUT_OF_RANGE | 1, torch.tensor([0, 9, 2]), 5)


def test_a_duplicate_verdict_names_the_repeated_row():
    with pytest.raises(fastft.FastFTIndexError, match=r"row 3 appears more than once.*rows\[2\]"):
        fcuda._raise_verdict("cache_write", DUPLICATE | 2, torch.tensor([3, 1, 3]), 5)


def test_launch_status_becomes_the_matching_error():
    fcuda._check_launch("cache_write", (_codes.LAUNCH_OK, ""))
    with pytest.raises(fastft.FastFTValueError, match=r"^dim must be positive\.$"):
        fcuda._check_launch("cache_write", (_codes.LAUNCH_BAD_ARGUMENT, "dim must be positive"))
    with pytest.raises(fcuda.CudaKernelError, match="invalid device function.*cache_gather"):
        fcuda._check_launch("cache_gather", (100, "invalid device function"))
    assert issubclass(fcuda.CudaKernelError, fastft.FastFTError)


def test_deferred_errors_are_raised_in_call_order(pending):
    first = deferred(pending, "cache_gather", _codes.ROWS_OK, [0], 4)
    second = deferred(pending, "cache_write", OUT_OF_RANGE | 0, [7], 4)
    deferred(pending, "cache_gather", DUPLICATE | 0, [1, 1], 4)
    with pytest.raises(fastft.FastFTIndexError, match=r"cache_write: rows\[0\] = 7"):
        fcuda.raise_pending_errors()
    assert first.waited and second.waited
    assert len(pending) == 1  # the later call's error is raised by the next check
    with pytest.raises(fastft.FastFTIndexError, match="row 1 appears more than once"):
        fcuda.raise_pending_errors()
    assert not pending
    fcuda.raise_pending_errors()  # nothing left: nothing raised


def test_without_waiting_only_finished_checks_are_read(pending):
    running = deferred(pending, "cache_write", OUT_OF_RANGE | 0, [9], 4, done=False)
    fcuda.raise_pending_errors(wait=False)  # not finished: left for later, nothing raised
    assert len(pending) == 1 and not running.waited
    running.done = True
    with pytest.raises(fastft.FastFTIndexError):
        fcuda.raise_pending_errors(wait=False)


def test_sync_checks_setting_returns_the_old_value():
    old = fcuda.set_sync_checks(False)
    try:
        assert fcuda.set_sync_checks(True) is False
        assert fcuda.set_sync_checks(True) is True
    finally:
        fcuda.set_sync_checks(old)


def test_an_unusable_runtime_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(fcuda, "_runtime_problem", lambda: "no CUDA driver (runtime 13000)")
    monkeypatch.setattr(fcuda, "_warned_runtime", False)
    cuda0 = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r"CUDA kernels cannot run \(no CUDA driver"):
        assert fcuda._native_usable(cuda0) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fcuda._native_usable(cuda0) is False  # said once


def test_a_usable_runtime_reports_deferred_errors(monkeypatch, pending):
    monkeypatch.setattr(fcuda, "_runtime_problem", lambda: None)
    capturing = set()  # the devices whose current stream is capturing
    monkeypatch.setattr(fcuda, "_capturing", lambda device: device in capturing)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert fcuda._native_usable(cuda0) is True
    deferred(pending, "cache_gather", OUT_OF_RANGE | 0, [5], 2)
    with pytest.raises(fastft.FastFTIndexError, match=r"rows\[0\] = 5"):
        fcuda._native_usable(cuda0)
    deferred(pending, "cache_gather", OUT_OF_RANGE | 0, [5], 2)
    capturing.add(cuda1)
    assert fcuda._native_usable(cuda1) is True  # queries are illegal while capturing: left queued
    assert len(pending) == 1


@pytest.mark.skipif(not fcuda.BUILT_WITH_CUDA, reason="fastft._C was built without CUDA")
def test_the_runtime_problem_names_both_versions_and_the_fix():
    info = fastft._native.native_module().cuda_runtime_info()
    problem = fcuda._runtime_problem()
    if not info["error"]:
        assert problem is None
        return
    assert info["error"] in problem
    assert f"runtime {info['runtime_version']}" in problem
    if info["driver_version"]:
        assert f"supports CUDA {info['driver_version']}" in problem
    else:
        assert "no CUDA driver is installed" in problem
    assert "FASTFT_CUDA=OFF" in problem
    assert not fastft.has_cuda()  # whatever torch says, the kernels cannot run
