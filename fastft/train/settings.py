"""FineTuner's settings: checked when given, kept in option objects, recorded by ``save``.

:func:`check_head_settings` and :func:`check_cache_settings` refuse settings out of range
before the model is touched, and :func:`training_device` resolves ``device``. The settings
then live in the tuner's :class:`~fastft.train.tuned.HeadOptions` and
:class:`~fastft.train.caches.CacheOptions`; each :class:`Setting` shows one of them as an
attribute of the tuner. :func:`saved_config` is the keywords that rebuild the tuner: what
``save`` records and ``load`` passes back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastft.cache.amp import resolve_amp
from fastft.cache.build import check_amp, check_views
from fastft.cache.layout import DTYPES
from fastft.errors import FastFTValueError

if TYPE_CHECKING:
    from fastft.train.caches import CacheOptions
    from fastft.train.tuned import HeadOptions

# The order of the settings when they were positional, for the message that names the new form.
OLD_INIT_ORDER = (
    "num_classes",
    "hidden",
    "head",
    "freeze",
    "cache",
    "cache_dtype",
    "views",
    "transform",
    "device",
    "seed",
)
OLD_FIT_ORDER = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "scheduler",
    "loss",
    "label_smoothing",
    "class_weights",
    "early_stopping",
    "callbacks",
    "amp",
)


class Setting:
    """A tuner setting kept in one of its option objects (the attribute ``holder``), read and
    written through; ``name`` is its name there when it differs from the tuner's."""

    def __init__(self, holder: str, name: str | None = None):
        self.holder, self.name = holder, name

    def __set_name__(self, owner: type, attr: str) -> None:
        self.name = self.name or attr

    def __get__(self, tuner: Any, owner: type) -> Any:
        return self if tuner is None else getattr(getattr(tuner, self.holder), self.name)

    def __set__(self, tuner: Any, value: Any) -> None:
        setattr(getattr(tuner, self.holder), self.name, value)


def check_head_settings(num_classes: int | None, head: nn.Module | None) -> None:
    """FastFTValueError unless ``num_classes`` can size a classifier (or ``head`` is given)."""
    if num_classes is not None and int(num_classes) < 2 and head is None:
        raise FastFTValueError(
            f"num_classes must be ≥ 2 for a classifier, got {num_classes}; for one regression "
            "output pass head=nn.Linear(in_features, 1) and loss='mse'."
        )


def check_cache_settings(
    cache_dtype: str,
    views: int,
    transform: Callable | None,
    extract_amp: str | None,
    device: torch.device | None = None,
) -> None:
    """FastFTValueError naming the first of the cache settings out of range (``device``:
    where the frozen pass runs; ``extract_amp='bf16'`` is refused where it is emulated)."""
    if cache_dtype not in DTYPES:  # the canonical names only (dtype_name also takes aliases)
        raise FastFTValueError(
            f"unknown cache_dtype {cache_dtype!r}; use one of {', '.join(DTYPES)}."
        )
    check_views(views, transform)
    check_amp(extract_amp, "extract_amp")
    if extract_amp == "bf16" and device is not None:
        resolve_amp(extract_amp, device, "extract_amp")


def training_device(device: str | torch.device | None) -> torch.device:
    """Where training runs: ``device``, else CUDA when available, else the CPU; a CUDA device
    that PyTorch cannot see is refused."""
    device = torch.device(
        device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastFTValueError(
            f"device={str(device)!r} but PyTorch sees no CUDA device here (torch "
            f"{torch.__version__}); leave device unset to train on the CPU."
        )
    return device


def saved_config(
    head: HeadOptions, cache: CacheOptions, freeze: str | Sequence[str] | None
) -> dict[str, Any]:
    """The FineTuner keywords that rebuild a tuner of these settings (``load`` passes them)."""
    return {
        "num_classes": head.num_classes,
        "hidden": list(head.hidden),
        "freeze": freeze,
        "cache": cache.tier,
        "cache_dtype": cache.dtype,
        "views": cache.views,
        "seed": cache.seed,
        "head_name": head.head_name,
        "output_key": head.output_key,
        "activation": head.activation,
        "dropout": head.dropout,
        "pool": cache.pool,
        "extract_amp": cache.amp,
    }
