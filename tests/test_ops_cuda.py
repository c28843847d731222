"""The fastft ops on CUDA: native kernels against the pure-PyTorch reference.

The same contract as on the CPU (tests/test_ops.py): copies, casts, max and first pooling
equal the reference exactly; a mean's error against fp64 is at most twice the reference's;
int8 agrees within one quantization step. The cache may live on the device or in pinned
host memory. Everything but the build checks at the top needs a GPU and is skipped without.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import fastft
from fastft.ops import cuda as fastft_cuda
from fastft.ops import reference

from helpers.native import needs_cuda_build, needs_cuda_device
from helpers.native import needs_cuda_kernels as needs_gpu
from helpers.ops import POOLS, SRC_DTYPES, STORAGE, assert_write_matches, make_src

# needs_gpu skips without a GPU and fails where a GPU and nvcc exist but fastft._C was built
# without its CUDA kernels; needs_cuda_build likewise, for tests that need no GPU.

PLACES = ["device", "pinned"]  # where the cache (dst of a write, src of a gather) lives

# (B, L, D, N, layout). D = 64 and 2048 take the 16-byte paths, odd D the scalar ones;
# "nchw" is a permuted feature map (D strided), "sliced" strides every axis, D = 9000
# int8 rows are too long for the shared-memory row cache and are pooled twice.
SHAPES = [
    (1, 1, 7, 3, "contiguous"),
    (4, 5, 64, 11, "contiguous"),
    (3, 257, 65, 9, "contiguous"),
    (8, 49, 70, 1000, "nchw"),
    (5, 12, 129, 40, "sliced"),
    (2, 3, 9000, 5, "contiguous"),
    (300, 2, 2048, 4096, "contiguous"),
]


# ---------------------------------------------------------------- build (no GPU needed)


@needs_cuda_build
def test_build_info_reports_the_cuda_build():
    info = fastft.build_info()
    assert info["cuda"] is True and fastft_cuda.BUILT_WITH_CUDA
    assert info["cuda_archs"] and all(a.isdigit() for a in info["cuda_archs"]), info["cuda_archs"]
    assert "native" not in info["cuda_archs"]
    assert isinstance(info["cuda_version"], str) and info["cuda_version"][0].isdigit()
    assert info["cuda_runtime"] == "static"


@needs_cuda_build
def test_native_module_loads_without_libcudart_or_driver():
    """fastft._C carries its CUDA runtime: it loads, and answers, where no driver exists."""
    path = importlib.util.find_spec("fastft._C").origin
    code = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("fastft._C", {path!r})
C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)   # without torch
maps = open("/proc/self/maps").read()
print(json.dumps({{"cudart_so": "libcudart.so" in maps, "info": C.cuda_runtime_info()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result["cudart_so"] is False, "libcudart.so was loaded: the runtime is not static"
    info = result["info"]
    assert info["runtime_version"] > 0
    if info["error"]:  # no driver or no device here: reported, not crashed
        assert info["device_count"] == 0
        assert not fastft.has_cuda()


def test_has_cuda_needs_a_device():
    if not torch.cuda.is_available():
        assert fastft.has_cuda() is False


# ---------------------------------------------------------------- helpers


def cache_tensor(t: torch.Tensor, place: str) -> torch.Tensor:
    return t.cuda() if place == "device" else t.pin_memory()


# ---------------------------------------------------------------- kernels (GPU)


@needs_gpu
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-D{}-N{}-{}".format(*s))
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES, ids=str)
def test_cache_write_matches_reference(src_dtype, storage, pool, shape, place):
    B, L, D, N, layout = shape
    if pool == "none":
        L = 1
    gen = torch.Generator().manual_seed(B * 1000 + L * 10 + D)
    src = make_src(B, L, D, layout, src_dtype, gen, "cuda")
    rows = torch.randperm(N, generator=gen)[:B]
    mask = None
    if pool == "masked_mean":
        mask = torch.rand(B, L, generator=gen) > 0.4
        mask[0] = False  # a fully masked sample pools to zero
    dst = cache_tensor(torch.full((N, D), 7, dtype=storage), place)
    scales = cache_tensor(torch.full((N,), -1.0), place)
    torch.ops.fastft.cache_write(
        src, rows.cuda(), dst, scales, pool, None if mask is None else mask.cuda()
    )
    torch.cuda.synchronize()
    assert dst.device.type == ("cuda" if place == "device" else "cpu")

    src_cpu = src.cpu()
    ref, ref_s = torch.full((N, D), 7, dtype=storage), torch.full((N,), -1.0)
    reference.cache_write(src_cpu, rows, ref, ref_s, pool, mask)
    nat, nat_s = dst.cpu(), scales.cpu()
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[rows] = False
    assert bool((nat[untouched] == 7).all()), "rows outside `rows` were written"
    exact = reference.pool_rows(src_cpu, pool, mask, dtype=torch.float64)
    assert_write_matches(nat, nat_s, ref, ref_s, rows, pool, storage, exact)


@needs_gpu
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize(
    "B,D,N,misaligned",
    [
        (1, 7, 3, False),
        (64, 33, 500, False),
        (300, 1030, 310, False),
        (257, 2048, 1000, False),
        (50, 64, 80, True),
        (70000, 16, 100, False),
    ],
)
def test_cache_gather_matches_reference_exactly(storage, out_dtype, B, D, N, misaligned, place):
    gen = torch.Generator().manual_seed(B + D)
    if storage == torch.int8:
        src = torch.randint(-127, 128, (N * D + 1,), generator=gen, dtype=torch.int8)
    else:
        src = torch.randn(N * D + 1, generator=gen).to(storage)
    # An offset of one element puts every row off 16-byte alignment: the scalar path.
    src = cache_tensor(src, place)
    src = (src[1:] if misaligned else src[: N * D]).view(N, D)
    scales = cache_tensor(torch.rand(N, generator=gen), place)
    rows = torch.randint(0, N, (B,), generator=gen)  # repeats are fine for a gather
    out = torch.ops.fastft.cache_gather(src, scales, rows.cuda(), out_dtype)
    assert out.device.type == "cuda" and out.shape == (B, D) and out.dtype == out_dtype
    expected = reference.cache_gather(src.cpu(), scales.cpu(), rows, out_dtype)
    assert torch.equal(out.cpu(), expected)


@needs_gpu
def test_write_then_gather_round_trip_through_pinned_host_cache():
    x = torch.randn(64, 49, 256, device="cuda")
    rows = torch.randperm(1000, device="cuda")[:64]
    dst = torch.empty(1000, 256, dtype=torch.int8).pin_memory()
    scales = torch.zeros(1000).pin_memory()
    fastft.ops.cache_write(x, rows, dst, scales, "mean")
    back = fastft.ops.cache_gather(dst, scales, rows, torch.float32)
    assert back.is_cuda
    expected = x.mean(1)
    step = scales.cuda()[rows].unsqueeze(1)
    assert bool(((back - expected).abs() <= step * 0.5001 + 1e-6).all())


@needs_gpu
def test_quantization_rounds_half_to_even_and_zero_rows_get_zero_scale():
    x = torch.tensor([[[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], [[0.0] * 6]], device="cuda")
    dst = torch.full((2, 6), 5, dtype=torch.int8, device="cuda")
    scales = torch.full((2,), 9.0, device="cuda")
    torch.ops.fastft.cache_write(x, torch.tensor([0, 1], device="cuda"), dst, scales, "none")
    assert dst[0].tolist() == [127, 0, 2, 2, 0, -2]
    assert dst[1].tolist() == [0] * 6 and scales[1].item() == 0.0


@needs_gpu
def test_kernels_run_on_the_current_stream():
    src = torch.randn(512, 4, 1024, device="cuda")
    rows = torch.arange(512, device="cuda")
    dst = torch.zeros(512, 1024, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.fastft.cache_write(src, rows, dst, torch.empty(0, device="cuda"), "max")
        out = torch.ops.fastft.cache_gather(dst, torch.empty(0, device="cuda"), rows, torch.float32)
    side.synchronize()
    assert torch.equal(out, src.amax(1).half().float())


@needs_gpu
def test_gather_can_be_captured_in_a_cuda_graph():
    src = torch.randn(1000, 256, device="cuda").half()
    rows = torch.randint(0, 1000, (128,), device="cuda")
    empty = torch.empty(0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        torch.ops.fastft.cache_gather(src, empty, rows, torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fastft.cache_gather(src, empty, rows, torch.float32)
    rows.copy_(torch.randint(0, 1000, (128,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, src[rows].float())


# ---------------------------------------------------------------- bad calls (GPU)


@needs_gpu
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(
    "rows,words",
    [
        ([0, 2, 5], "rows[2] = 5 is outside"),
        ([0, -1, 4], "rows[1] = -1"),
        ([4, 2, 4], "row 4 appears more than once"),
        ([4, 9, 4], "rows[1] = 9 is outside"),
    ],
)
def test_bad_rows_raise_and_leave_dst_untouched(rows, words, place):
    dst = cache_tensor(torch.zeros(5, 8, dtype=torch.float16), place)
    src = torch.randn(3, 4, 8, device="cuda")
    with pytest.raises(
        fastft.FastFTIndexError, match=words.replace("[", r"\[").replace("]", r"\]")
    ):
        torch.ops.fastft.cache_write(
            src, torch.tensor(rows, device="cuda"), dst, torch.empty(0), "mean"
        )
    torch.cuda.synchronize()
    assert bool((dst.cpu() == 0).all())


@needs_gpu
def test_bad_gather_row_raises_index_error():
    src = torch.zeros(4, 8, device="cuda")
    with pytest.raises(fastft.FastFTIndexError, match="outside the cache's 4 rows"):
        torch.ops.fastft.cache_gather(
            src, torch.empty(0), torch.tensor([1, 4], device="cuda"), torch.float32
        )


@needs_gpu
def test_deferred_row_checks_raise_at_a_later_call():
    src = torch.zeros(4, 8, device="cuda")
    old = fastft_cuda.set_sync_checks(False)
    try:
        out = torch.ops.fastft.cache_gather(
            src, torch.empty(0), torch.tensor([7], device="cuda"), torch.float32
        )
        assert out.shape == (1, 8)  # no error yet: nothing waited for the kernel
        with pytest.raises(fastft.FastFTIndexError, match=r"rows\[0\] = 7"):
            fastft_cuda.raise_pending_errors()
    finally:
        fastft_cuda.set_sync_checks(old)
        fastft_cuda.raise_pending_errors()


@needs_gpu
def test_deferred_row_checks_block_raises_when_it_ends_and_only_defers_its_own_thread():
    import threading

    src = torch.zeros(4, 8, device="cuda")
    bad = torch.tensor([7], device="cuda")
    with pytest.raises(fastft.FastFTIndexError, match=r"rows\[0\] = 7"):
        with fastft_cuda.deferred_row_checks():
            out = torch.ops.fastft.cache_gather(src, torch.empty(0), bad, torch.float32)
            assert out.shape == (1, 8)  # no error yet: nothing waited for the kernel
            errors = []

            def other_thread():
                try:
                    torch.ops.fastft.cache_gather(src, torch.empty(0), bad, torch.float32)
                except fastft.FastFTIndexError as exc:
                    errors.append(exc)

            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()
            assert len(errors) == 1  # that thread still checks at once
    fastft_cuda.raise_pending_errors()


def test_deferred_row_checks_is_a_no_op_for_cpu_tensors():
    src = torch.arange(32.0).reshape(4, 8)
    with fastft_cuda.deferred_row_checks():
        with pytest.raises(fastft.FastFTIndexError):
            torch.ops.fastft.cache_gather(src, torch.empty(0), torch.tensor([7]), torch.float32)


@needs_cuda_device
def test_reference_kernels_serve_a_pinned_host_cache_from_cuda():
    """The fallback when fastft's CUDA kernels cannot run (old driver, or built without nvcc)."""
    src = torch.randn(3, 5, 8, device="cuda")
    dst = torch.zeros(6, 8).pin_memory()
    rows = torch.tensor([4, 0, 2], device="cuda")
    reference.cache_write(src, rows, dst, torch.empty(0), "mean")
    torch.testing.assert_close(dst[rows.cpu()], src.mean(dim=1).cpu())
    out = reference.cache_gather(dst, torch.empty(0), rows, torch.float32)
    assert out.is_cuda
    torch.testing.assert_close(out, src.mean(dim=1))


@needs_gpu
def test_unpinned_host_cache_is_refused():
    src = torch.randn(2, 1, 8, device="cuda")
    with pytest.raises(fastft.FastFTValueError, match="pinned"):
        torch.ops.fastft.cache_write(
            src, torch.tensor([0, 1], device="cuda"), torch.zeros(2, 8), torch.empty(0), "none"
        )
    with pytest.raises(fastft.FastFTValueError, match="pinned"):
        torch.ops.fastft.cache_gather(
            torch.zeros(2, 8), torch.empty(0), torch.tensor([0], device="cuda"), torch.float32
        )


# ---------------------------------------------------------------- opcheck (GPU)


# opcheck clones its inputs into ordinary (unpinned) memory, so it checks device caches only;
# pinned caches are covered by the value tests above.


@needs_gpu
@pytest.mark.parametrize("storage", STORAGE, ids=str)
def test_opcheck_cache_write(storage):
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(4, 6, 16, generator=gen).cuda()
    mask = (torch.rand(4, 6, generator=gen) > 0.5).cuda()
    for pool, m in [("mean", None), ("max", None), ("masked_mean", mask)]:
        dst = torch.zeros(10, 16, dtype=storage, device="cuda")
        scales = torch.zeros(10, device="cuda")
        args = (src, torch.tensor([1, 3, 5, 7], device="cuda"), dst, scales, pool, m)
        torch.library.opcheck(torch.ops.fastft.cache_write.default, args)


@needs_gpu
@pytest.mark.parametrize("storage", STORAGE, ids=str)
def test_opcheck_cache_gather(storage):
    gen = torch.Generator().manual_seed(2)
    src = (
        torch.randn(10, 16, generator=gen).to(storage)
        if storage != torch.int8
        else torch.randint(-127, 128, (10, 16), generator=gen, dtype=torch.int8)
    )
    args = (
        src.cuda(),
        torch.rand(10, generator=gen).cuda(),
        torch.tensor([0, 9, 9, 2], device="cuda"),
        torch.float16,
    )
    torch.library.opcheck(torch.ops.fastft.cache_gather.default, args)


# ---------------------------------------------------------------- issue 23 (GPU)


@needs_gpu
def test_has_cuda_means_the_cuda_kernels_serve():
    """has_cuda() true only where the kernels run: not the reference after a warning."""
    assert fastft.has_cuda(), fastft.build_info()["cuda_problem"]
    fastft.ops.backend_calls(reset=True)
    dst, scales = torch.zeros(4, 8, dtype=torch.int8, device="cuda"), torch.zeros(4, device="cuda")
    rows = torch.arange(2, device="cuda")
    fastft.ops.cache_write(torch.randn(2, 3, 8, device="cuda"), rows, dst, scales, "mean")
    fastft.ops.cache_gather(dst, scales, rows)
    assert fastft.ops.backend_calls() == {("cache_write", "cuda"): 1, ("cache_gather", "cuda"): 1}


@needs_gpu
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("pool", ["first", "mean", "max", "masked_mean"])
@pytest.mark.parametrize("D", [8, 9000])  # 16-byte path with the row cache; scalar, pooled twice
def test_int8_rows_with_nan_or_inf_get_a_nonfinite_scale(pool, D, place):
    src = torch.randn(5, 3, D)
    src[1, 0, 2], src[2, 0, D - 1], src[3, 0, 5], src[4] = (
        float("nan"),
        float("inf"),
        -float("inf"),
        0,
    )
    mask = torch.ones(5, 3, dtype=torch.bool) if pool == "masked_mean" else None
    rows = torch.tensor([6, 0, 3, 1, 5])
    ref_dst, ref_scales = torch.zeros(7, D, dtype=torch.int8), torch.zeros(7)
    reference.cache_write(src, rows, ref_dst, ref_scales, pool, mask)
    dst = cache_tensor(torch.zeros(7, D, dtype=torch.int8), place)
    scales = cache_tensor(torch.zeros(7), place)
    m = None if mask is None else mask.cuda()
    torch.ops.fastft.cache_write(src.cuda(), rows.cuda(), dst, scales, pool, m)
    torch.cuda.synchronize()
    bad = [0, 3, 5] + ([] if pool == "max" else [1])  # -Inf does not survive a max
    torch.testing.assert_close(scales.cpu()[bad], ref_scales[bad], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dst.cpu()[bad], ref_dst[bad])
    assert torch.isnan(scales.cpu()[0]) and torch.isinf(scales.cpu()[3])


@needs_gpu
@pytest.mark.parametrize("D", [8, 33])
def test_masked_positions_holding_nan_do_not_reach_the_result(D):
    src = torch.randn(4, 6, D)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:], mask[3] = False, False
    src[:, 4], src[:2, 5, 0] = float("nan"), float("inf")
    ref = torch.zeros(4, D)
    reference.cache_write(src, torch.arange(4), ref, torch.empty(0), "masked_mean", mask)
    out = torch.zeros(4, D, device="cuda")
    torch.ops.fastft.cache_write(
        src.cuda(), torch.arange(4, device="cuda"), out, torch.empty(0), "masked_mean", mask.cuda()
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


@needs_gpu
def test_a_duplicate_names_the_first_repeat_whatever_the_timing():
    """Many duplicates in a large batch: the CUDA kernel must name the CPU kernel's row."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        rows = torch.randint(0, 3000, (4096,), generator=g)  # ~2800 repeats among 4096 rows
        src = torch.zeros(4096, 1, 4)
        with pytest.raises(fastft.FastFTIndexError) as cpu_error:
            torch.ops.fastft.cache_write(src, rows, torch.zeros(3000, 4), torch.empty(0), "none")
        with pytest.raises(fastft.FastFTIndexError) as cuda_error:
            torch.ops.fastft.cache_write(
                src.cuda(), rows.cuda(), torch.zeros(3000, 4, device="cuda"), torch.empty(0), "none"
            )
        assert str(cuda_error.value) == str(cpu_error.value), trial


@needs_gpu
def test_deferred_checks_of_many_threads_each_raise_their_own():
    import threading

    src = torch.zeros(4, 8, device="cuda")
    errors: dict[int, list[str]] = {}

    def work(k: int) -> None:
        got = errors.setdefault(k, [])
        try:
            with fastft_cuda.deferred_row_checks():
                for _ in range(50):
                    torch.ops.fastft.cache_gather(
                        src, torch.empty(0), torch.tensor([1], device="cuda"), torch.float32
                    )
                torch.ops.fastft.cache_gather(
                    src, torch.empty(0), torch.tensor([100 + k], device="cuda"), torch.float32
                )
        except fastft.FastFTIndexError as exc:
            got.append(str(exc))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for k in range(6):
        assert len(errors[k]) == 1 and f"rows[0] = {100 + k} " in errors[k][0], errors


@needs_gpu
def test_the_capture_check_reads_the_ops_device():
    dev = torch.device("cuda", torch.cuda.current_device())
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(dev)
    assert not fastft_cuda._capturing(dev)
    with torch.cuda.graph(graph, stream=stream):
        seen = fastft_cuda._capturing(dev)
        x = torch.zeros(1, device=dev) + 1  # something to capture
    assert seen and not fastft_cuda._capturing(dev) and x.shape == (1,)


@needs_gpu
def test_pinned_storage_reserves_what_the_tier_budget_counts():
    from fastft.cache import layout

    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        pytest.skip("this torch has no torch.cuda.host_memory_stats()")
    before = stats().get("reserved_bytes.current", stats().get("allocated_bytes.current"))
    rows, dim = 3001, 517  # sizes no cached pinned block has: fresh allocations
    storage = layout.allocate(rows, dim, torch.int8, torch.device("cpu"), pin=True)
    after = stats().get("reserved_bytes.current", stats().get("allocated_bytes.current"))
    tap = layout.TapInfo("t", dim, (dim,), torch.int8, "mean")
    assert after - before == storage.nbytes + layout.pinned_overhead(rows, [tap])
