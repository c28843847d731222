"""Builders for the new layers a FineTuner adds: hidden layers and the output layer."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastft.errors import FastFTValueError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def build_head(
    in_features: int,
    num_outputs: int,
    hidden: Sequence[int] | None = None,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """``[Linear → activation (→ Dropout)] × len(hidden) → Linear(num_outputs)``.

    With no hidden layers this is a single ``nn.Linear``. ``seed`` makes the random
    initialisation reproducible without touching the global RNG stream.
    """
    if activation not in ACTIVATIONS:
        raise FastFTValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}.")
    if not 0.0 <= dropout < 1.0:
        raise FastFTValueError(f"dropout must be in [0, 1), got {dropout}.")
    widths = list(hidden or [])
    if any(int(w) <= 0 for w in widths):
        raise FastFTValueError(f"hidden widths must be positive integers, got {widths}.")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = in_features
        for w in widths:
            layers += [nn.Linear(width, int(w)), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(w)
        layers.append(nn.Linear(width, num_outputs))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
