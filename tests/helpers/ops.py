"""What the native kernel tests share, on the CPU (test_ops) and CUDA (test_ops_cuda): the
dtypes and pooling modes they sweep, their source tensors, and the acceptance rule of a
native cache_write against the reference — exact for copies, casts, max and first; int8
within one quantization step; means no worse than twice the float32 reference's error
against float64."""

from __future__ import annotations

import torch

SRC_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STORAGE = [torch.float32, torch.bfloat16, torch.float16, torch.int8]
POOLS = ["none", "first", "mean", "max", "masked_mean"]


def make_src(B, L, D, layout, dtype, gen, device="cpu"):
    """A ``[B, L, D]`` source of ``dtype`` on ``device``: contiguous, ``"nchw"`` (a
    ``[B, C, H, W]`` feature map seen as ``[B, HW, C]`` without a copy) or ``"sliced"``
    (every other position and a strided batch axis)."""
    if layout == "nchw":
        x = torch.randn(B, D, L, 1, generator=gen).to(dtype).to(device)
        src = x.flatten(2).transpose(1, 2)
        assert L == 1 or not src.is_contiguous()
        return src
    if layout == "sliced":
        x = torch.randn(B * 2, L * 2, D + 3, generator=gen).to(dtype).to(device)
        return x[::2, ::2, 1 : D + 1]
    return torch.randn(B, L, D, generator=gen).to(dtype).to(device)


def assert_write_matches(nat, nat_s, ref, ref_s, rows, pool, storage, exact64):
    """Compare native (nat, nat_s) with reference (ref, ref_s) results, on the CPU."""
    if pool in ("none", "first", "max"):
        assert torch.equal(nat, ref)
        assert torch.equal(nat_s, ref_s)
        return
    if storage == torch.int8:
        step = ref_s[rows].unsqueeze(1)
        torch.testing.assert_close(nat_s[rows], ref_s[rows], rtol=1e-6, atol=0)
        deq_nat = nat[rows].float() * nat_s[rows].unsqueeze(1)
        deq_ref = ref[rows].float() * ref_s[rows].unsqueeze(1)
        assert bool(((deq_nat - deq_ref).abs() <= step * 1.0001 + 1e-12).all())
        assert bool(((deq_nat.double() - exact64).abs() <= step.double() * 0.5001 + 1e-7).all())
        return
    err_nat = (nat[rows].double() - exact64).abs().max().item()
    err_ref = (ref[rows].double() - exact64).abs().max().item()
    assert err_nat <= 2 * err_ref + 1e-12, (err_nat, err_ref)
