"""Bad calls of the fastft ops raise clear FastFTError subclasses and write nothing."""

from __future__ import annotations

import pytest
import torch

import fastft
from fastft.ops import reference

IMPLS = {"reference": (reference.cache_write, reference.cache_gather)}
if fastft.has_native():
    IMPLS["native"] = (torch.ops.fastft.cache_write, torch.ops.fastft.cache_gather)


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def good_write_args(storage=torch.float16):
    return dict(
        src=torch.randn(3, 4, 8),
        rows=torch.tensor([0, 2, 4]),
        dst=torch.zeros(5, 8, dtype=storage),
        scales=torch.zeros(5),
        pool="mean",
        mask=None,
    )


def call_write(impl, **override):
    args = {**good_write_args(), **override}
    impl[0](args["src"], args["rows"], args["dst"], args["scales"], args["pool"], args["mask"])
    return args


@pytest.mark.parametrize(
    "rows,exc,words",
    [
        (torch.tensor([0, 2, 5]), fastft.FastFTIndexError, "rows[2] = 5 is outside"),
        (torch.tensor([0, -1, 4]), fastft.FastFTIndexError, "rows[1] = -1"),
        (torch.tensor([4, 2, 4]), fastft.FastFTIndexError, "row 4 appears more than once"),
    ],
)
def test_bad_rows_raise_and_leave_dst_untouched(impl, rows, exc, words):
    dst = torch.zeros(5, 8, dtype=torch.float16)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        call_write(impl, rows=rows, dst=dst)
    assert bool((dst == 0).all())


def test_index_errors_are_also_index_errors(impl):
    with pytest.raises(IndexError):
        call_write(impl, rows=torch.tensor([0, 1, 9]))


@pytest.mark.parametrize(
    "override,words",
    [
        (dict(src=torch.randn(3, 8)), "must be a \\[B, L, D\\] view"),
        (dict(src=torch.randint(0, 5, (3, 4, 8))), "src dtype int64 is not supported"),
        (dict(dst=torch.zeros(5, 9)), "D = 8 features but dst rows hold 9"),
        (dict(dst=torch.zeros(5, 8, dtype=torch.int32)), "not a storage dtype"),
        (dict(dst=torch.zeros(8, 5).t()), "contiguous"),
        (dict(rows=torch.tensor([0, 2, 4], dtype=torch.int32)), "1-D int64"),
        (dict(rows=torch.tensor([0, 2])), "2 rows given for a batch of B = 3"),
        (dict(pool="median"), "unknown pool 'median'"),
        (dict(pool="none"), "pool='none' needs L = 1"),
        (dict(pool="masked_mean"), "needs mask\\[B, L\\]"),
        (dict(pool="masked_mean", mask=torch.ones(3, 5)), "mask has shape \\(3, 5\\)"),
        (
            dict(pool="masked_mean", mask=torch.ones(3, 4, dtype=torch.float64)),
            "mask dtype float64",
        ),
        (dict(mask=torch.ones(3, 4)), "only used with pool='masked_mean'"),
        (
            dict(dst=torch.zeros(5, 8, dtype=torch.int8), scales=torch.zeros(4)),
            "float32 scales\\[N\\] with N = 5",
        ),
    ],
)
def test_bad_write_arguments(impl, override, words):
    with pytest.raises(fastft.FastFTValueError, match=words):
        call_write(impl, **override)


@pytest.mark.parametrize(
    "args,exc,words",
    [
        (
            (torch.zeros(4, 8), torch.empty(0), torch.tensor([4]), torch.float32),
            fastft.FastFTIndexError,
            "outside the cache's 4 rows",
        ),
        (
            (torch.zeros(4, 8), torch.empty(0), torch.tensor([1]), torch.int8),
            fastft.FastFTValueError,
            "out_dtype int8",
        ),
        (
            (torch.zeros(4, 8), torch.empty(0), torch.tensor([[1]]), torch.float32),
            fastft.FastFTValueError,
            "1-D int64",
        ),
        (
            (torch.zeros(4), torch.empty(0), torch.tensor([1]), torch.float32),
            fastft.FastFTValueError,
            "must be \\[N, D\\]",
        ),
        (
            (torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3), torch.tensor([1]), torch.float32),
            fastft.FastFTValueError,
            "scales",
        ),
        (
            (torch.zeros(8, 4).t(), torch.empty(0), torch.tensor([1]), torch.float32),
            fastft.FastFTValueError,
            "contiguous",
        ),
    ],
)
def test_bad_gather_arguments(impl, args, exc, words):
    with pytest.raises(exc, match=words):
        impl[1](*args)


def test_errors_come_through_torch_ops_dispatch():
    with pytest.raises(fastft.FastFTIndexError):
        torch.ops.fastft.cache_gather(
            torch.zeros(2, 3), torch.empty(0), torch.tensor([2]), torch.float32
        )
