"""The fastft ops: native CPU kernels against the pure-PyTorch reference.

Copies, casts, max and first pooling must match the reference exactly; mean pooling may
differ only by rounding, and its error against an fp64 computation must be at most twice
the reference's; int8 results agree within one quantization step.
"""

from __future__ import annotations

import pytest
import torch

import fastft
from fastft.ops import reference

from helpers.native import needs_native
from helpers.ops import POOLS, SRC_DTYPES, STORAGE, assert_write_matches, make_src

pytestmark = needs_native  # a run without fastft._C fails in conftest unless it opts out


# (B, L, D, N, layout): B=1, odd D, large L, N much larger than B, and non-contiguous views.
SHAPES = [
    (1, 1, 7, 3, "contiguous"),
    (4, 5, 33, 11, "contiguous"),
    (3, 257, 65, 9, "contiguous"),
    (8, 49, 70, 1000, "nchw"),
    (5, 12, 129, 40, "sliced"),
]


def write_both(src, rows, n, storage, pool, mask):
    outs = []
    for impl in (torch.ops.fastft.cache_write, reference.cache_write):
        dst = torch.full((n, src.shape[2]), 7, dtype=storage)
        scales = torch.full((n,), -1.0)
        impl(src, rows, dst, scales, pool, mask)
        outs.append((dst, scales))
    return outs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-D{}-N{}-{}".format(*s))
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES, ids=str)
def test_cache_write_matches_reference(shape, pool, storage, src_dtype):
    B, L, D, N, layout = shape
    if pool == "none":
        L = 1
    gen = torch.Generator().manual_seed(B * 1000 + L * 10 + D)
    src = make_src(B, L, D, layout, src_dtype, gen)
    rows = torch.randperm(N, generator=gen)[:B]
    mask = None
    if pool == "masked_mean":
        mask = torch.rand(B, L, generator=gen) > 0.4
        mask[0] = False  # a fully masked row pools to zero
    (nat, nat_s), (ref, ref_s) = write_both(src, rows, N, storage, pool, mask)

    untouched = torch.ones(N, dtype=torch.bool)
    untouched[rows] = False
    assert bool((nat[untouched] == 7).all()), "rows outside `rows` were written"

    exact = reference.pool_rows(src, pool, mask, dtype=torch.float64)  # fp64 oracle
    assert_write_matches(nat, nat_s, ref, ref_s, rows, pool, storage, exact)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("B,D,N", [(1, 7, 3), (64, 33, 500), (300, 1030, 310)])
def test_cache_gather_matches_reference_exactly(storage, out_dtype, B, D, N):
    gen = torch.Generator().manual_seed(B + D)
    if storage == torch.int8:
        src = torch.randint(-127, 128, (N, D), generator=gen, dtype=torch.int8)
    else:
        src = torch.randn(N, D, generator=gen).to(storage)
    scales = torch.rand(N, generator=gen)
    rows = torch.randint(0, N, (B,), generator=gen)  # repeats are fine for a gather
    out = torch.ops.fastft.cache_gather(src, scales, rows, out_dtype)
    assert out.shape == (B, D) and out.dtype == out_dtype and out.is_contiguous()
    assert torch.equal(out, reference.cache_gather(src, scales, rows, out_dtype))


def test_write_then_gather_round_trip_bounds():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 384, generator=gen)
    rows = torch.arange(64)
    expected = x[:, 0]
    bounds = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}
    for storage, rel in bounds.items():
        dst = torch.empty(64, 384, dtype=storage)
        fastft.ops.cache_write(x, rows, dst, torch.empty(0), "none")
        back = fastft.ops.cache_gather(dst, torch.empty(0), rows)
        assert bool(((back - expected).abs() <= expected.abs() * rel).all()), storage
    dst = torch.empty(64, 384, dtype=torch.int8)
    scales = torch.empty(64)
    fastft.ops.cache_write(x, rows, dst, scales, "none")
    back = fastft.ops.cache_gather(dst, scales, rows)
    assert torch.allclose(scales, expected.abs().amax(1) / 127)
    assert bool(((back - expected).abs() <= scales.unsqueeze(1) / 2 * 1.0001).all())


def test_all_zero_row_quantizes_to_zero_scale():
    x = torch.zeros(2, 3, 16)
    x[1] = 1.0
    dst = torch.full((2, 16), 5, dtype=torch.int8)
    scales = torch.full((2,), 9.0)
    torch.ops.fastft.cache_write(x, torch.tensor([0, 1]), dst, scales, "mean")
    assert scales[0].item() == 0.0 and bool((dst[0] == 0).all())
    assert scales[1].item() == pytest.approx(1 / 127) and bool((dst[1] == 127).all())


def test_quantization_rounds_half_to_even():
    # With max|x| = 127 the scale is exactly 1, so x / scale hits .5 ties exactly.
    x = torch.tensor([[[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]]])
    dst = torch.empty(1, 6, dtype=torch.int8)
    scales = torch.empty(1)
    torch.ops.fastft.cache_write(x, torch.tensor([0]), dst, scales, "none")
    assert dst[0].tolist() == [127, 0, 2, 2, 0, -2]


def test_max_pool_propagates_nan_like_torch():
    x = torch.randn(2, 4, 8)
    x[1, 2, 3] = float("nan")
    dst = torch.empty(2, 8)
    torch.ops.fastft.cache_write(x, torch.tensor([0, 1]), dst, torch.empty(0), "max")
    assert torch.equal(
        dst,
        x.amax(1),
    ) or torch.allclose(dst, x.amax(1), equal_nan=True)
    assert torch.isnan(dst[1, 3])


@pytest.mark.parametrize("op", ["cache_write", "cache_gather"])
def test_opcheck(op):
    gen = torch.Generator().manual_seed(1)
    if op == "cache_write":
        # A [B, L, D] = [4, 6, 16] view of a [4, 16, 6] tensor: strided, not contiguous.
        src = torch.randn(4, 16, 6, generator=gen).transpose(1, 2)
        assert src.shape == (4, 6, 16)
        for storage in STORAGE:
            for pool, mask in [
                ("mean", None),
                ("masked_mean", torch.rand(4, 6, generator=gen) > 0.5),
            ]:
                dst = torch.zeros(10, 16, dtype=storage)
                args = (src, torch.tensor([1, 3, 5, 7]), dst, torch.zeros(10), pool, mask)
                assert not args[0].is_contiguous()
                torch.library.opcheck(torch.ops.fastft.cache_write.default, args)
    else:
        for storage in STORAGE:  # cache_gather requires a contiguous src (it refuses others)
            src = (
                torch.randn(10, 16, generator=gen).to(storage)
                if storage != torch.int8
                else torch.randint(-127, 128, (10, 16), generator=gen, dtype=torch.int8)
            )
            args = (src, torch.rand(10, generator=gen), torch.tensor([0, 9, 9, 2]), torch.float16)
            torch.library.opcheck(torch.ops.fastft.cache_gather.default, args)


def test_torch_compile_sees_the_ops():
    src = torch.randn(100, 32).half()
    rows = torch.tensor([3, 1, 4, 1, 5])

    @torch.compile(backend="eager", fullgraph=True)
    def gather(s, r):
        return torch.ops.fastft.cache_gather(s, torch.empty(0), r, torch.float32) * 2

    assert torch.equal(gather(src, rows), src[rows].float() * 2)
