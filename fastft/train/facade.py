"""What :class:`~fastft.FineTuner` is made of besides its operations.

:func:`tuner_options` checks FineTuner's keywords and turns them into its two option objects,
:class:`~fastft.train.tuned.HeadOptions` and :class:`~fastft.train.caches.CacheOptions`;
:class:`TunerAttributes`, FineTuner's base class, shows those settings and the parts of the
edited model (``model``, ``prefix``, ``tail``, ``device``) as attributes of the tuner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastft.train.caches import CacheOptions
from fastft.train.settings import (
    Setting,
    check_cache_settings,
    check_head_settings,
    training_device,
)
from fastft.train.tuned import HeadOptions

__all__ = ["INIT_SETTINGS", "TunerAttributes", "tuner_options"]

#: FineTuner's keywords that :func:`tuner_options` reads (all but ``model`` and ``freeze``).
INIT_SETTINGS = (
    "num_classes",
    "hidden",
    "head",
    "cache",
    "cache_dtype",
    "views",
    "transform",
    "device",
    "seed",
    "head_name",
    "output_key",
    "activation",
    "dropout",
    "pool",
    "cache_dir",
    "max_memory",
    "extract_batch_size",
    "extract_amp",
    "transform_id",
    "verbose",
)


def tuner_options(s: Mapping[str, Any]) -> tuple[HeadOptions, CacheOptions]:
    """The option objects of FineTuner's keywords ``s`` (those of :data:`INIT_SETTINGS`),
    checked: FastFTValueError naming the first setting out of range."""
    check_head_settings(s["num_classes"], s["head"])
    device = training_device(s["device"])
    check_cache_settings(s["cache_dtype"], s["views"], s["transform"], s["extract_amp"], device)
    head = HeadOptions(
        num_classes=None if s["num_classes"] is None else int(s["num_classes"]),
        hidden=list(s["hidden"] or []),
        head=s["head"],
        head_name=s["head_name"],
        output_key=s["output_key"],
        activation=s["activation"],
        dropout=float(s["dropout"]),
        seed=int(s["seed"]),
    )
    cache = CacheOptions(
        tier=s["cache"],
        dtype=s["cache_dtype"],
        views=int(s["views"]),
        transform=s["transform"],
        transform_id=s["transform_id"],
        pool=s["pool"],
        cache_dir=s["cache_dir"],
        max_memory=s["max_memory"],
        batch_size=int(s["extract_batch_size"]),
        amp=s["extract_amp"],
        seed=int(s["seed"]),
        device=device,
        verbose=s["verbose"],
    )
    return head, cache


class TunerAttributes:
    """FineTuner's settings (see its docstring) and model parts, as attributes. Setting one
    (``ft.cache_dtype = "fp32"``) changes what the next build or fit uses."""

    head_options: HeadOptions
    cache_options: CacheOptions

    num_classes = Setting("head_options")
    hidden = Setting("head_options")
    head = Setting("head_options")
    head_name = Setting("head_options")
    output_key = Setting("head_options")
    activation = Setting("head_options")
    dropout = Setting("head_options")
    cache_tier = Setting("cache_options", "tier")
    cache_dtype = Setting("cache_options", "dtype")
    views = Setting("cache_options")
    transform = Setting("cache_options")
    transform_id = Setting("cache_options")
    pool = Setting("cache_options")
    cache_dir = Setting("cache_options")
    max_memory = Setting("cache_options")
    extract_batch_size = Setting("cache_options", "batch_size")
    extract_amp = Setting("cache_options", "amp")
    verbose = Setting("cache_options")

    @property
    def model(self) -> nn.Module:
        """The edited model (a new root module when a head was appended to an encoder)."""
        return self.tuned.model

    @property
    def prefix(self) -> nn.Module | None:
        """The frozen part of the current split (None before the first split)."""
        return self.tuned.prefix

    @property
    def tail(self) -> nn.Module | None:
        """The trainable part of the current split."""
        return self.tuned.tail

    @property
    def device(self) -> torch.device:
        """Where training runs."""
        return self.tuned.device

    @property
    def seed(self) -> int:
        """Seeds the new layers' initialisation and the batch order."""
        return self.cache_options.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.head_options.seed = self.cache_options.seed = int(value)

    @property
    def freeze(self) -> str | Sequence[str] | None:
        """What the tuner froze (its ``freeze=`` setting)."""
        return self.tuned.freeze
