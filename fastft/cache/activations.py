"""What the frozen prefix returns, seen as the cache stores it, and the checks on each write.

:func:`taps_of` names the prefix's outputs, :func:`as_bld` and :func:`tap_shape` give each
one's ``[B, L, D]`` view and per-sample shape, :func:`check_finite` and :func:`check_exact`
refuse rows the cache cannot hold, and :func:`describe_inputs` says what a failed chunk was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastft.cache.layout import TapStorage, dtype_str
from fastft.errors import DataError

__all__ = ["as_bld", "tap_shape", "taps_of", "check_finite", "check_exact", "describe_inputs"]


# ---------------------------------------------------------------------------- activations
def as_bld(x: torch.Tensor, pool: str) -> torch.Tensor:
    """An activation seen as ``[B, L, D]`` for cache_write (a view wherever possible).

    ``pool='none'`` keeps the whole activation as one position (D = its size per sample);
    otherwise ``[B, D]`` is one position, ``[B, L, D]`` stays, and channel-first maps
    ``[B, C, H, W, ...]`` become ``[B, H*W*..., C]`` positions of C channels.
    """
    if pool == "none" or x.dim() == 2:
        return x.reshape(x.shape[0], 1, -1)
    if x.dim() == 3:
        return x
    if x.dim() >= 4:
        return x.flatten(2).transpose(1, 2)
    raise DataError(
        f"a frozen activation of shape {tuple(x.shape)} has no per-sample features to cache."
    )


def tap_shape(x: torch.Tensor, pool: str) -> tuple[int, ...]:
    return tuple(x.shape[1:]) if pool == "none" else (int(as_bld(x, pool).shape[2]),)


def taps_of(out: Any, prefix: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the prefix's output (a tensor, a tuple/list, or a dict)."""
    if isinstance(out, torch.Tensor):
        tensors = [out]
    elif isinstance(out, dict):
        return [str(k) for k in out], list(out.values())
    elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out) and out:
        tensors = list(out)
    else:
        raise DataError(
            "the frozen prefix must return a tensor or a tuple of tensors, got "
            f"{type(out).__name__}."
        )
    names = (
        prefix.tap_names if getattr(type(prefix), "_fastft_prefix", False) else None
    )  # a split's own names
    if not names or len(names) != len(tensors):
        names = [f"tap{i}" for i in range(len(tensors))]
    return [str(n) for n in names], tensors


def check_finite(
    store: TapStorage,
    rows: slice | torch.Tensor,
    name: str,
    samples: int | torch.Tensor,
    view: int,
    views: int,
) -> None:
    """Raise DataError when a just-written row is NaN or Inf.

    The check reads the stored rows (D values per sample, not L x D), so it costs little and
    covers exactly what training will read: NaN/Inf from the prefix (pooling propagates them)
    and values that overflow the storage dtype (fp16 beyond 65504). An int8 row's scale is
    non-finite exactly when its row was. ``samples``: the first sample's position, or every
    sample's (rows visited out of order), for the message.
    """
    written = store.scales[rows] if store.data.dtype == torch.int8 else store.data[rows]
    finite = torch.isfinite(written.reshape(written.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        sample = int(samples[bad]) if isinstance(samples, torch.Tensor) else samples + bad
        where = f" (view {view})" if views > 1 else ""
        raise DataError(
            f"the frozen features of sample {sample}{where} are NaN or Inf in tap {name!r} "
            f"(or too large for the {dtype_str(store.data.dtype)} storage dtype); check that "
            "sample's input and the pretrained weights, or store in bf16/fp32. The cache was not "
            "completed."
        )


def check_exact(x: torch.Tensor, name: str, samples: str) -> None:
    """A non-float tap is stored in fp32, which holds integers exactly only up to 2**24."""
    if x.dtype == torch.bool or x.numel() == 0:
        return
    if int(x.abs().max()) > 2**24:
        raise DataError(
            f"tap {name!r} (dtype {x.dtype}) of {samples} holds integers beyond 2**24, "
            "which the cache cannot store exactly; move the cut so that this tensor is computed "
            "in the tail."
        )


def describe_inputs(inputs: Any) -> str:
    """``inputs`` in a few words: shape, dtype and device of a tensor or of each tensor of a
    dict."""

    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{list(t.shape)} {dtype_str(t.dtype)} on {t.device}"
        return type(t).__name__

    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    return one(inputs)
