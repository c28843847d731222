"""Outputs of a trained tail: on a cache (validation, evaluate) and on raw inputs (predict)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fastft import data as fdata
from fastft.cache.store import Store
from fastft.model.calling import dtype_mismatch
from fastft.train.config import FitConfig
from fastft.train.engine import tap_dtype
from fastft.train.metrics import fit_metrics


def logits_from_cache(
    tail: nn.Module, cache: Store, *, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``tail``'s outputs for every row of ``cache``, in order (eval mode, no grad)."""
    was_training = tail.training
    tail.eval()
    outs = []
    where = cache.index_device(device)  # rows made where they are read: no copy, no sync
    dtype = tap_dtype(tail)
    try:
        with torch.no_grad(), cache.deferred_checks():  # rows in range by construction
            for start in range(0, cache.num_rows, batch_size):
                rows = torch.arange(start, min(start + batch_size, cache.num_rows), device=where)
                taps = cache.gather_shaped(rows, out_dtype=dtype, check_rows=False)
                outs.append(tail(*[t.to(device, non_blocking=True) for t in taps]).float())
    finally:
        tail.train(was_training)
    return torch.cat(outs)


def eval_config(fit: FitConfig | None, batch_size: int) -> FitConfig:
    """The settings ``evaluate`` computes with: the last fit's loss (and its smoothing and
    class weights), in batches of ``batch_size`` (evaluate's own, not the fit's)."""
    if fit is None:
        return FitConfig(batch_size=batch_size)
    return dataclasses.replace(fit, batch_size=batch_size)


def cache_metrics(
    tail: nn.Module, cache: Store, cfg: FitConfig, *, device: torch.device
) -> dict[str, float]:
    """The fit's loss and metrics of ``tail`` on ``cache``'s rows and labels."""
    logits = logits_from_cache(tail, cache, batch_size=cfg.batch_size, device=device)
    return fit_metrics(
        logits,
        cache.labels.to(logits.device),
        loss=cfg.loss,
        label_smoothing=cfg.label_smoothing,
        class_weights=cfg.class_weights,
    )


def num_outputs(tail: nn.Module, cache: Store, *, device: torch.device) -> int:
    """Width of ``tail``'s output (one row of ``cache`` through it)."""
    probe = cache.gather_shaped(torch.arange(1), out_dtype=tap_dtype(tail))
    was_training = tail.training
    tail.eval()
    try:
        with torch.no_grad():
            out = tail(*[t.to(device) for t in probe])
    finally:
        tail.train(was_training)
    return int(out.shape[-1]) if out.dim() > 1 else 1


def predict(
    prefix: nn.Module, tail: nn.Module, x: Any, *, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``tail(*prefix(x))`` in batches of ``batch_size`` (eval mode, no grad)."""
    prefix.eval()
    tail.eval()
    outs = []
    n = fdata.batch_length(x)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            part = fdata.index_select(x, torch.arange(start, min(start + batch_size, n)))
            try:
                taps = prefix(fdata.to_device(part, device))
            except Exception as exc:  # data of another dtype than the model: say which
                clash = dtype_mismatch(exc, part, prefix)
                if clash is not None:
                    raise clash from exc
                raise
            outs.append(tail(*(taps if isinstance(taps, tuple) else (taps,))))
    return torch.cat(outs)
