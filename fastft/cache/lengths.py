"""Length-aware batching of the frozen pass over padded token sequences.

Tokenised text is padded to one length, and a transformer's cost grows with it: a batch
whose longest sample has 40 tokens pays for 256 when run as padded. The build visits such
samples longest first (:func:`length_order`), cuts each batch to its longest sample
(:func:`trim`) and writes every row to its sample's own position, so the cache is the one
the dataset-order pass would write, up to float rounding.

That holds only for a prefix whose outputs at real tokens, pooled without the padding
(CLS, masked mean, or its own pooling), do not depend on how much padding follows; the
build checks it once, in fp32, on the samples cut the most (:func:`same_outputs`), and
keeps dataset order when it does not hold.
"""

from __future__ import annotations

from typing import Any

import torch

from fastft.data.sources import TensorSource

__all__ = [
    "visit_order",
    "sequence_lengths",
    "length_order",
    "trim",
    "per_sample",
    "same_outputs",
]


def visit_order(source: Any, mask_key: str, views: int, transform: Any) -> torch.Tensor | None:
    """The order a build visits ``source`` in when batching by length pays: (X, y) tensors
    whose dict inputs carry a token mask with padding somewhere, no transform (it could
    change the lengths), one view. None: the data's own order.

    The order depends only on the data, so every rank of a sharded build and every resume
    of an interrupted one visits the same samples in the same chunks.
    """
    if transform is not None or views != 1 or not isinstance(source, TensorSource):
        return None
    lengths = sequence_lengths(source.X, mask_key)
    if lengths is None or source.n < 2 or int(lengths.min()) >= source.X[mask_key].shape[1]:
        return None
    return length_order(lengths)


def sequence_lengths(inputs: Any, mask_key: str) -> torch.Tensor | None:
    """Per sample, the position after its last real token (from ``inputs[mask_key]``), or
    None when the inputs are not a dict holding a [N, L] mask beside [N, L, ...] tensors.

    Left padding gives L for every sample: nothing to cut, and nothing cut.
    """
    if not isinstance(inputs, dict) or not isinstance(inputs.get(mask_key), torch.Tensor):
        return None
    mask = inputs[mask_key]
    if (
        mask.dim() != 2
        or mask.shape[1] < 2
        or mask.is_floating_point()
        and not mask.isfinite().all()
    ):
        return None
    n, length = mask.shape
    for value in inputs.values():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != n:
            return None  # something that is not per-token: cutting could change it
    real = mask != 0
    positions = torch.arange(1, length + 1, device=mask.device).expand_as(real)
    return (positions * real).amax(dim=1)


def length_order(lengths: torch.Tensor) -> torch.Tensor:
    """Sample indices longest first (stable: ties keep dataset order), so that the first
    batch, which sizes the cache and any memory estimate, is the most expensive one."""
    return torch.sort(lengths, descending=True, stable=True).indices


def trim(inputs: dict, mask_key: str) -> dict:
    """``inputs`` cut along the token axis to the batch's longest sample: every tensor whose
    second axis has the mask's length is sliced there; other entries are left as they are."""
    mask = inputs[mask_key]
    length = int(mask.shape[1])
    longest = int(((mask != 0) * torch.arange(1, length + 1, device=mask.device)).amax())
    longest = max(longest, 1)
    if longest == length:
        return inputs
    return {
        key: value[:, :longest]
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length
        else value
        for key, value in inputs.items()
    }


def per_sample(x: torch.Tensor, pool: str, mask: torch.Tensor) -> torch.Tensor | None:
    """A tap as the cache will hold it, per sample, when that cannot depend on the padding
    after the last real token (``mask``: the batch's [B, L] mask); None when it can: a
    per-token tap kept whole (``pool='none'``) or pooled over every position."""
    if x.dim() <= 2:
        return x.reshape(x.shape[0], -1)  # already one vector per sample
    if x.dim() != 3 or x.shape[1] != mask.shape[1]:
        return None
    if pool == "first":
        return x[:, 0]
    if pool == "masked_mean":
        weights = (mask != 0).to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1)
    return None


def same_outputs(a: list[torch.Tensor], b: list[torch.Tensor], bf16: bool) -> bool:
    """Whether two runs' pooled taps agree up to the rounding of the precision they ran in
    (relative to each tap's largest magnitude)."""
    if len(a) != len(b):
        return False
    tol = 2e-2 if bf16 else 1e-4
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        x, y = x.float(), y.float()
        scale = max(float(x.abs().amax()), 1e-6)
        if not bool(torch.isfinite(x).all()) or float((x - y).abs().amax()) > tol * scale:
            return False
    return True
