"""cache_write / cache_gather: native CPU kernels vs the pure-PyTorch reference (2 threads).

Run: ``.venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only``.
Goal (issue 3): native ≥ 1.5× the reference on every case.
"""

from __future__ import annotations

import pytest
import torch

import fastft
from fastft.ops import reference

pytestmark = pytest.mark.skipif(not fastft.has_native(), reason="native module not built")

IMPLS = {
    "native": (torch.ops.fastft.cache_write, torch.ops.fastft.cache_gather),
    "reference": (reference.cache_write, reference.cache_gather),
}


WRITE_CASES = {
    # ResNet-50's last feature map [256, 2048, 7, 7] as its [B, HW, C] view, mean-pooled.
    "write nchw[256,2048,7,7] mean fp32->int8": ("nchw", torch.int8, "mean"),
    "write nchw[256,2048,7,7] mean fp32->fp16": ("nchw", torch.float16, "mean"),
    # MiniLM-sized token states, masked mean as sentence encoders pool.
    "write tokens[256,128,384] masked_mean fp32->fp16": ("tokens", torch.float16, "masked_mean"),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_cache_write(benchmark, recorder, case, impl):
    layout, storage, pool = WRITE_CASES[case]
    g = torch.Generator().manual_seed(0)
    B, N = 256, 4096
    if layout == "nchw":
        src = torch.randn(B, 2048, 7, 7, generator=g).flatten(2).transpose(1, 2)
        mask = None
    else:
        src = torch.randn(B, 128, 384, generator=g)
        mask = (torch.rand(B, 128, generator=g) > 0.3).long()
    dst = torch.zeros(N, src.shape[2], dtype=storage)
    scales = torch.zeros(N)
    rows = torch.randperm(N, generator=g)[:B]
    write = IMPLS[impl][0]
    recorder.run(
        benchmark,
        case,
        impl,
        lambda: write(src, rows, dst, scales, pool, mask),
        baseline="reference",
    )


GATHER_CASES = {
    "gather N=200k D=2048 B=1024 int8->fp32": torch.int8,
    "gather N=200k D=2048 B=1024 fp16->fp32": torch.float16,
}


@pytest.fixture(scope="module")
def caches():
    g = torch.Generator().manual_seed(1)
    N, D = 200_000, 2048
    return {
        torch.int8: (
            torch.randint(-127, 128, (N, D), generator=g, dtype=torch.int8),
            torch.rand(N, generator=g),
        ),
        torch.float16: (torch.randn(N, D, generator=g, dtype=torch.float16), torch.empty(0)),
    }


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", sorted(GATHER_CASES))
def test_cache_gather(benchmark, recorder, caches, case, impl):
    src, scales = caches[GATHER_CASES[case]]
    rows = torch.randint(0, src.shape[0], (1024,), generator=torch.Generator().manual_seed(2))
    gather = IMPLS[impl][1]
    recorder.run(
        benchmark,
        case,
        impl,
        lambda: gather(src, scales, rows, torch.float32),
        baseline="reference",
        rounds=50,
    )
