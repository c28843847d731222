"""The acceptance rule of a native cache_write against the reference, shared by the CPU and
CUDA kernel tests: exact for copies, casts, max and first; int8 within one quantization
step; means no worse than twice the float32 reference's error against float64."""

from __future__ import annotations

import torch


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
