"""``FeatureCache``: the frozen prefix's output for every sample (and view), ready to gather.

A cache holds, per tap (frontier activation), ``[views * N, D]`` rows in a storage dtype on
one tier, plus the labels ``[N, ...]``. Training reads it with :meth:`FeatureCache.gather`,
one fused ``cache_gather`` per tap. Build one with :meth:`FeatureCache.build`, reopen a disk
cache with :meth:`FeatureCache.open`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastft.cache import build as builder
from fastft.cache.layout import TapInfo
from fastft.cache.manage import resolve
from fastft.cache.store import Store, open_folder

__all__ = ["FeatureCache", "TapInfo"]


class FeatureCache(Store):
    """Cached frozen features of a dataset; see :meth:`build`.

    Attributes: ``num_rows`` (samples N), ``num_views``, ``taps`` (list of :class:`TapInfo`),
    ``labels`` ([N, ...]), ``fingerprint`` (hex), ``tier`` ('device' | 'host' | 'disk'),
    ``path`` (disk folder or None), ``telemetry`` (dict), ``nbytes``.
    """

    @classmethod
    def of(cls, store: Store) -> FeatureCache:
        """``store`` as a FeatureCache (the same storage, telemetry of its own).

        Args:
            store: a :class:`~fastft.cache.store.Store` (what the build functions return).
        """
        cache = cls.__new__(cls)
        cache.__dict__.update(store.__dict__)
        cache.telemetry = dict(store.telemetry)
        return cache

    @classmethod
    def build(
        cls,
        prefix: nn.Module,
        dataset: Any,
        *,
        dtype: str | torch.dtype = "fp16",
        tier: str = "auto",
        views: int = 1,
        transform: Callable | None = None,
        pool: str = "none",
        mask_key: str = "attention_mask",
        batch_size: int = 256,
        num_workers: int = 0,
        cache_dir: str | Path | None = None,
        dataset_id: str | None = None,
        transform_id: str | None = None,
        max_memory: int | str | None = None,
        progress: bool | str = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        amp: str | None = None,
    ) -> FeatureCache:
        """Run ``prefix`` once per sample (and view) of ``dataset`` and cache its output.

        ``prefix(inputs)`` takes one tensor or dict of tensors and returns a tensor or a tuple
        of tensors (one tap each). It runs in eval mode under ``torch.inference_mode`` and
        each batch of activations is pooled, cast or quantized and written into the tier's
        storage by ``cache_write``, tap by tap.

        Args:
            prefix: the frozen part (a :class:`~fastft.FrozenPrefix`, or any module taking one
                batch and returning a tensor or a tuple of tensors).
            dataset: ``(X, y)`` tensors, a map-style Dataset of ``(input, label)`` or a
                DataLoader (used as it is: its batches, collate function and sampler).
            dtype: storage dtype, ``fp32 | bf16 | fp16 | int8`` (int8: per-row fp32 scale);
                default ``fp16``.
            tier: ``device | host | disk | auto`` (default: the fastest that fits
                ``max_memory``).
            views: with a random ``transform``, K augmented views per sample (K forward passes).
            transform: callable on a batch of inputs, applied before the prefix; random ones
                are seeded per chunk from ``seed`` (through the global RNG, and through a
                ``generator=`` keyword when the transform takes one), so views are reproducible.
            pool: how an activation's positions are reduced (``none`` (default) | ``mean`` |
                ``max`` | ``masked_mean`` | ``first``).
            mask_key: the input entry ``masked_mean`` takes the mask from (default
                ``"attention_mask"``).
            batch_size, num_workers: how raw samples are loaded (default 256, 0; a DataLoader
                is used as is, in dataset order).
            cache_dir: disk caches' folder (default ``$FASTFT_CACHE_DIR`` or ``~/.cache/fastft``).
            dataset_id: a name for the data's content: the key then uses it instead of hashing
                every sample (which reads the whole dataset once per build); the labels of
                ``(X, y)`` tensors still count. Change it whenever the data change.
            transform_id: a name for what the transform computes with that fastft cannot see
                (files it reads, an object without readable state); without it, such a
                transform's caches are never reused.
            max_memory: bytes (or ``"2GB"``) the in-memory tiers may use: ``tier="auto"`` goes
                to disk past it (default: half of the memory free now).
            progress: show a tqdm bar (only on a terminal); a string is the bar's label
                (default ``"fastft cache"``; a FineTuner says ``"train cache"``, ``"val cache"``)
                and names the build's log line; False logs that line at DEBUG only.
            seed: seeds a random ``transform`` per chunk (default 0), so views are reproducible.
            device: where the prefix runs (default: where its parameters are). On a CUDA
                device each chunk's inputs are pinned and copied on a side stream while the
                previous chunk runs (see :mod:`fastft.cache.staging`).
            amp: ``'bf16'`` runs the prefix under bf16 autocast (faster on GPUs with bf16
                tensor cores; the features carry bf16 rounding, so it is part of the key).

        The same key returns the existing cache without running the prefix: from this process
        for any tier, from ``cache_dir`` for disk caches; an interrupted disk build resumes.
        The key is computed again at every call from the prefix's modules and weights, the
        data, the transform and the settings (see :mod:`fastft.cache.fingerprint` for what it
        covers). One log line (logger ``"fastft.cache"``, INFO) says whether it was a hit and
        why it was (re)built, e.g. ``train cache: built in 2.1 s, 2.9 MiB, fp16, 1500x512, disk
        at … (rebuilt because the frozen weights changed)``; ``telemetry`` holds the same.
        ``$FASTFT_CACHE_MAX_SIZE`` (e.g. ``20G``): after a disk build, the least recently used
        other caches of ``cache_dir`` beyond that size are removed (see ``fastft cache prune``).
        """
        return cls.of(
            builder.build(
                prefix,
                dataset,
                dtype=dtype,
                tier=tier,
                views=views,
                transform=transform,
                pool=pool,
                mask_key=mask_key,
                batch_size=batch_size,
                num_workers=num_workers,
                cache_dir=cache_dir,
                dataset_id=dataset_id,
                max_memory=max_memory,
                progress=progress,
                seed=seed,
                device=device,
                amp=amp,
                transform_id=transform_id,
            )
        )

    @classmethod
    def open(
        cls, fingerprint_or_path: str | Path, cache_dir: str | Path | None = None
    ) -> FeatureCache:
        """Reopen a complete disk cache, checked as in :meth:`from_folder` (sizes, fingerprint,
        labels; the features' checksums before they are first read).

        Args:
            fingerprint_or_path: a fingerprint (or a unique prefix of one), or a folder (a
                ``Path``, or a string with a ``/``).
            cache_dir: where fingerprints are looked up (default ``$FASTFT_CACHE_DIR`` or
                ``~/.cache/fastft``).
        """
        folder = resolve(fingerprint_or_path, cache_dir)
        return cls.from_folder(folder, telemetry={"hit": True, "reason": "opened"})

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        telemetry: dict | None = None,
        *,
        expected: str | None = None,
        verified: bool = False,
    ) -> FeatureCache:
        """Map a complete cache folder, read-only (see :func:`fastft.cache.store.open_folder`
        for what is checked).

        Args:
            folder: the cache's folder.
            telemetry: the telemetry dict the cache reports (default: none).
            expected: the fingerprint the folder must hold (default: any).
            verified: the caller has just built and checksummed it (default False: the
                checksums are checked before the features are first read).
        """
        return cls.of(open_folder(Path(folder), telemetry, expected=expected, verified=verified))
