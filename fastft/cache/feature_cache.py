"""``FeatureCache``: the frozen prefix's output for every sample (and view), ready to gather.

A cache holds, per tap (frontier activation), ``[views * N, D]`` rows in a storage dtype on
one tier, plus the labels ``[N, ...]``. Training reads it with :meth:`FeatureCache.gather`,
one fused ``cache_gather`` per tap. Build one with :meth:`FeatureCache.build`, reopen a disk
cache with :meth:`FeatureCache.open`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fastft.cache import disk
from fastft.cache.storage import TapStorage
from fastft.errors import FastFTIndexError, FastFTValueError


@dataclass(frozen=True)
class TapInfo:
    """One cached frontier activation.

    ``dim`` is the row width D; ``shape`` the per-sample shape the tail expects (the
    activation's own shape with ``pool='none'``, ``(D,)`` otherwise); ``dtype`` the storage dtype.
    ``source_dtype`` is set for a non-float tap (an attention mask, token ids the tail needs):
    it is stored exactly in fp32 whatever the cache dtype and gathered back in this dtype.
    """

    name: str
    dim: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    pool: str
    source_dtype: torch.dtype | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "dim": self.dim, "shape": list(self.shape),
             "dtype": disk.dtype_to_str(self.dtype), "pool": self.pool}
        if self.source_dtype is not None:
            d["source_dtype"] = str(self.source_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TapInfo":
        source = d.get("source_dtype")
        return cls(d["name"], int(d["dim"]), tuple(d["shape"]), disk.str_to_dtype(d["dtype"]), d["pool"],
                   None if source is None else _exact_dtype(source))


def _exact_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point:
        from fastft.errors import CacheCorruptError

        raise CacheCorruptError(f"the manifest names an unknown source dtype {name!r} for a non-float tap.")
    return dtype


class FeatureCache:
    """Cached frozen features of a dataset; see :meth:`build`.

    Attributes: ``num_rows`` (samples N), ``num_views``, ``taps`` (list of :class:`TapInfo`),
    ``labels`` ([N, ...]), ``fingerprint`` (hex), ``tier`` ('device' | 'host' | 'disk'),
    ``path`` (disk folder or None), ``telemetry`` (dict), ``nbytes``.
    """

    def __init__(self, *, fingerprint: str, parts: dict, tier: str, taps: list[TapInfo],
                 storages: list[TapStorage], labels: torch.Tensor, num_rows: int, num_views: int,
                 path: Path | None = None, telemetry: dict | None = None):
        self.fingerprint = fingerprint
        self.parts = parts
        self.tier = tier
        self.taps = taps
        self._storages = storages
        self.labels = labels
        self.num_rows = num_rows
        self.num_views = num_views
        self.path = path
        self.telemetry = telemetry or {}
        self._verifier: disk.ChunkVerifier | None = None  # a disk cache's checks on first read

    # ------------------------------------------------------------------ construction
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
        progress: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        amp: str | None = None,
    ) -> "FeatureCache":
        """Run ``prefix`` once per sample (and view) of ``dataset`` and cache its output.

        ``prefix(inputs)`` takes one tensor or dict of tensors and returns a tensor or a tuple
        of tensors (one tap each). It runs in eval mode under ``torch.inference_mode`` and
        each batch of activations is pooled, cast or quantized and written into the tier's
        storage by ``cache_write``, tap by tap.

        Args:
            dtype: storage dtype, ``fp32 | bf16 | fp16 | int8`` (int8: per-row fp32 scale).
            tier: ``device | host | disk | auto`` (fastest that fits ``max_memory``, default
                half of what is free now).
            views: with a random ``transform``, K augmented views per sample (K forward passes).
            transform: callable on a batch of inputs, applied before the prefix; random ones
                are seeded per chunk from ``seed`` (through the global RNG, and through a
                ``generator=`` keyword when the transform takes one), so views are reproducible.
            pool: how an activation's positions are reduced (``none | mean | max |
                masked_mean | first``); ``masked_mean`` takes the mask from ``inputs[mask_key]``.
            batch_size, num_workers: how raw samples are loaded (a DataLoader is used as is,
                in dataset order).
            cache_dir: disk caches' folder (default ``$FASTFT_CACHE_DIR`` or ``~/.cache/fastft``).
            dataset_id: a name for the data's content: the key then uses it instead of hashing
                every sample (which reads the whole dataset once per build); the labels of
                ``(X, y)`` tensors still count. Change it whenever the data change.
            transform_id: a name for what the transform computes with that fastft cannot see
                (files it reads, an object without readable state); without it, such a
                transform's caches are never reused.
            progress: show a tqdm bar (only on a terminal).
            device: where the prefix runs (default: where its parameters are). On a CUDA
                device each chunk's inputs are pinned and copied on a side stream while the
                previous chunk runs (see :mod:`fastft.cache.staging`).
            amp: ``'bf16'`` runs the prefix under bf16 autocast (faster on GPUs with bf16
                tensor cores; the features carry bf16 rounding, so it is part of the key).

        The same key returns the existing cache without running the prefix: from this process
        for any tier, from ``cache_dir`` for disk caches; an interrupted disk build resumes.
        The key is computed again at every call from the prefix's modules and weights, the
        data, the transform and the settings (see :mod:`fastft.cache.fingerprint` for what it
        covers). ``telemetry`` says whether it was a hit and why it was (re)built.
        """
        from fastft.cache.builder import build

        return build(cls, prefix, dataset, dtype=dtype, tier=tier, views=views, transform=transform,
                     pool=pool, mask_key=mask_key, batch_size=batch_size, num_workers=num_workers,
                     cache_dir=cache_dir, dataset_id=dataset_id, max_memory=max_memory,
                     progress=progress, seed=seed, device=device, amp=amp, transform_id=transform_id)

    @classmethod
    def open(cls, fingerprint_or_path: str | Path, cache_dir: str | Path | None = None) -> "FeatureCache":
        """Reopen a complete disk cache by fingerprint (or a unique prefix of it) in ``cache_dir``,
        or by folder (a ``Path``, or a string with a ``/``).

        Checked as in :meth:`from_folder` (sizes, fingerprint, labels; the features' checksums
        before they are first read).
        """
        from fastft.cache.manage import resolve

        folder = resolve(fingerprint_or_path, cache_dir)
        return cls.from_folder(folder, telemetry={"hit": True, "reason": "opened"})

    @classmethod
    def from_folder(cls, folder: Path, telemetry: dict | None = None, *, expected: str | None = None,
                    verified: bool = False) -> "FeatureCache":
        """Map a complete cache folder, read-only.

        Checked: the manifest (valid, complete, its fingerprint that of the folder and, when
        given, the ``expected`` key), every file's size, the labels' checksums; the features'
        checksums are checked before they are first read in this process (at once for caches
        up to ``disk.VERIFY_AT_OPEN_BYTES``, chunk by chunk on first read for larger ones).
        Raises CacheCorruptError when a check fails. ``verified``: the caller has just built
        the cache and checksummed its bytes in this process (no second pass over them).
        """
        from fastft.errors import CacheCorruptError

        disk.ensure_real_folder(folder)
        manifest = disk.read_manifest(folder)
        if manifest["fingerprint"] != folder.name or (expected is not None and manifest["fingerprint"] != expected):
            raise CacheCorruptError(
                f"cache folder {folder} holds a manifest of cache {manifest['fingerprint'][:12]}"
                + (f", not of the key asked for ({expected[:12]})" if expected and expected != folder.name else "")
                + ": a cache folder is named by its own fingerprint. Remove it and build again."
            )
        if manifest.get("status") != "complete":
            from fastft.errors import CacheError

            if disk.is_being_built(folder.parent, folder.name):
                raise CacheError(
                    f"cache {folder.name} is incomplete: another process is building it now. Wait for it, "
                    "or call FeatureCache.build with the same arguments, which waits and then reuses it."
                )
            raise CacheError(f"cache {folder.name} is incomplete (an interrupted build); build it again to resume.")
        disk.check_sizes(folder, manifest)
        tensors = {a.name: disk.map_array(folder, a, writable=False) for a in disk.arrays(manifest)}
        verifier = None if verified else disk.ChunkVerifier(folder, manifest, tensors)  # checks the labels
        taps = [TapInfo.from_json(t) for t in manifest["taps"]]
        empty = torch.empty(0, dtype=torch.float32)
        storages = [TapStorage(tensors[t.name], tensors.get(t.name + ".scales", empty)) for t in taps]
        if verifier is not None and sum(s.nbytes for s in storages) <= disk.VERIFY_AT_OPEN_BYTES:
            verifier.check_all()
        labels = tensors["labels"].clone()  # small, and writable like those of the other tiers
        nbytes = sum(s.nbytes for s in storages) + labels.numel() * labels.element_size()
        info = {"rows": manifest["num_rows"] * manifest["num_views"], "bytes": {"disk": nbytes},
                "build_seconds": 0.0, "prefix_seconds": 0.0, "write_seconds": 0.0}
        info.update(telemetry or {})
        cache = cls(fingerprint=manifest["fingerprint"], parts=manifest["parts"], tier="disk", taps=taps,
                    storages=storages, labels=labels, num_rows=manifest["num_rows"],
                    num_views=manifest["num_views"], path=folder, telemetry=info)
        cache._verifier = None if verifier is None or verifier.done else verifier
        return cache

    def with_telemetry(self, **telemetry) -> "FeatureCache":
        """The same cache (shared storage) with its own telemetry, for a reuse of it."""
        clone = copy.copy(self)
        clone.telemetry = dict(self.telemetry, **telemetry)
        return clone

    # ------------------------------------------------------------------ reading
    def index_device(self, device: torch.device) -> torch.device:
        """Where row indices should be made to gather for training on ``device``: the cache's
        device, or ``device`` for a pinned host cache read by CUDA kernels (no copies of rows
        back and forth, hence no host synchronisation per batch)."""
        data = self._storages[0].data
        if data.device.type == "cpu" and device.type == "cuda" and data.is_pinned():
            return device
        return data.device

    def _physical_rows(self, rows: torch.Tensor, view: int | torch.Tensor | None,
                       check_rows: bool = True) -> torch.Tensor:
        rows = torch.as_tensor(rows)
        if rows.dtype != torch.int64:
            if rows.is_floating_point() or rows.dtype == torch.bool:
                raise FastFTValueError(f"gather: rows must be integer sample indices, got {rows.dtype}.")
            rows = rows.long()
        if rows.dim() != 1:
            raise FastFTValueError(f"gather: rows must be 1-D, got shape {tuple(rows.shape)}.")
        rows = rows.to(self.index_device(rows.device))  # CUDA rows stay for a pinned host cache
        if view is None or (isinstance(view, int) and view == 0):
            if self.num_views > 1 and check_rows:
                self._check_rows(rows)  # else a row >= N would silently read view 1
            return rows
        if isinstance(view, int):
            if not 0 <= view < self.num_views:
                raise FastFTIndexError(f"gather: view {view} is outside the cache's {self.num_views} views.")
            if check_rows:
                self._check_rows(rows)
            return rows + view * self.num_rows
        view = torch.as_tensor(view).to(rows.device, torch.int64)
        if view.shape != rows.shape:
            raise FastFTValueError(f"gather: view has shape {tuple(view.shape)} but rows {tuple(rows.shape)}.")
        if check_rows:
            if view.numel() and (int(view.min()) < 0 or int(view.max()) >= self.num_views):
                raise FastFTIndexError(f"gather: a view index is outside the cache's {self.num_views} views.")
            self._check_rows(rows)
        return rows + view * self.num_rows

    def _check_rows(self, rows: torch.Tensor) -> None:
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            bad = int(((rows < 0) | (rows >= self.num_rows)).nonzero()[0, 0])
            raise FastFTIndexError(
                f"gather: rows[{bad}] = {int(rows[bad])} is outside the cache's {self.num_rows} samples."
            )

    def gather(self, rows, *, view: int | torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """Rows ``rows[B]`` of every tap as ``[B, D]`` tensors in ``out_dtype`` (dequantized;
        a non-float tap is cast from its exact fp32 copy, see :meth:`gather_shaped` for its own dtype).

        ``view`` is one view index for all rows, an int64 tensor ``[B]`` of view indices, or
        None for view 0.
        """
        return tuple(x if tap.source_dtype is None else x.to(out_dtype)
                     for x, tap in zip(self._gather(rows, view, out_dtype), self.taps))

    def _gather(self, rows, view, out_dtype: torch.dtype, check_rows: bool = True) -> list[torch.Tensor]:
        # A non-float tap is read in fp32, which holds its integers exactly: bf16 rounds token
        # ids above 256 (fp16 above 2048) to their neighbours.
        physical = self._physical_rows(rows, view, check_rows)
        if self._verifier is not None:
            self._verifier.check(physical)  # a chunk's checksums before its first row is used
        return [torch.ops.fastft.cache_gather(s.data, s.scales, physical,
                                              out_dtype if tap.source_dtype is None else torch.float32)
                for s, tap in zip(self._storages, self.taps)]

    def gather_shaped(self, rows, *, view: int | torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.float32, check_rows: bool = True) -> tuple[torch.Tensor, ...]:
        """:meth:`gather` with each tap reshaped to ``[B, *tap.shape]``, as the tail takes it.

        ``check_rows=False`` skips the range checks of ``rows`` and ``view`` made here (each
        reads a value back to the host: a synchronisation on CUDA), for indices valid by
        construction. The kernels still check every physical row they read.
        """
        out = self._gather(rows, view, out_dtype, check_rows)
        # A non-float tap (a mask, token ids) goes back to its own dtype: it is exact in fp32.
        return tuple(x.view(x.shape[0], *tap.shape) if tap.source_dtype is None
                     else x.view(x.shape[0], *tap.shape).to(tap.source_dtype)
                     for x, tap in zip(out, self.taps))

    # ------------------------------------------------------------------ management
    @property
    def nbytes(self) -> int:
        """Bytes of the cached features, scales and labels."""
        return sum(s.nbytes for s in self._storages) + self.labels.numel() * self.labels.element_size()

    def verify(self) -> dict:
        """Check a disk cache's sizes and every chunk checksum (CacheCorruptError on a
        mismatch); in-memory caches have no stored bytes to check and report so."""
        if self.path is None:
            return {"fingerprint": self.fingerprint, "tier": self.tier, "ok": True,
                    "checked": "nothing: in-memory caches are not checksummed"}
        return disk.verify_folder(self.path)

    def __repr__(self) -> str:
        taps = ", ".join(f"{t.name}{list(t.shape)}:{disk.dtype_to_str(t.dtype)}" for t in self.taps)
        return (f"FeatureCache({self.fingerprint[:12]}, tier={self.tier}, rows={self.num_rows}, "
                f"views={self.num_views}, taps=[{taps}], {self.nbytes / 2**20:.1f} MiB)")
