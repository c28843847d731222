"""A cache's contents and how they are read: per tap ``[views * N, D]`` rows in a storage dtype
on one tier, the labels ``[N, ...]``, and the gathers that fetch rows for training.

:class:`Store` is what the builder makes and the registry keeps; :class:`~fastft.FeatureCache`
is the same object with the public ways to build and open one. :func:`open_folder` maps a
complete disk cache, checked.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fastft.cache import disk, journal
from fastft.cache.folders import ensure_real_folder, is_being_built
from fastft.cache.journal import ChunkVerifier, verify_folder
from fastft.cache.layout import TapInfo, TapStorage, dtype_str
from fastft.errors import CacheCorruptError, CacheError, FastFTIndexError, FastFTValueError
from fastft.ops.cuda import deferred_row_checks


class Store:
    """Cached frozen features of a dataset (see :class:`~fastft.FeatureCache`, the public name).

    Attributes: ``num_rows`` (samples N), ``num_views``, ``taps`` (list of :class:`TapInfo`),
    ``labels`` ([N, ...]), ``fingerprint`` (hex), ``parts`` (the key's parts), ``tier``
    ('device' | 'host' | 'disk'), ``path`` (disk folder or None), ``telemetry`` (dict), ``nbytes``.
    """

    def __init__(
        self,
        *,
        fingerprint: str,
        parts: dict,
        tier: str,
        taps: list[TapInfo],
        storages: list[TapStorage],
        labels: torch.Tensor,
        num_rows: int,
        num_views: int,
        path: Path | None = None,
        telemetry: dict | None = None,
    ):
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
        self._verifier: ChunkVerifier | None = None  # a disk cache's checks on first read

    @property
    def storages(self) -> list[TapStorage]:
        """Each tap's rows (and int8 scales): the tensors the gathers read."""
        return self._storages

    def check_all(self) -> None:
        """Check every checksum of a disk cache now (before all of it is read at once)."""
        if self._verifier is not None:
            self._verifier.check_all()

    def with_telemetry(self, **telemetry) -> Store:
        """The same cache (shared storage) with its own telemetry, for a reuse of it.

        Args:
            **telemetry: entries that replace or add to the telemetry (``hit=True``, ...).
        """
        clone = copy.copy(self)
        clone.telemetry = dict(self.telemetry, **telemetry)
        return clone

    # ------------------------------------------------------------------ reading
    def index_device(self, device: torch.device) -> torch.device:
        """Where row indices should be made to gather for training on ``device``: the cache's
        device, or ``device`` for a pinned host cache read by CUDA kernels (no copies of rows
        back and forth, hence no host synchronisation per batch).

        Args:
            device: where training runs.
        """
        data = self._storages[0].data
        if data.device.type == "cpu" and device.type == "cuda" and data.is_pinned():
            return device  # pragma: cuda
        return data.device

    def _physical_rows(
        self, rows: torch.Tensor, view: int | torch.Tensor | None, check_rows: bool = True
    ) -> torch.Tensor:
        rows = torch.as_tensor(rows)
        if rows.dtype != torch.int64:
            if rows.is_floating_point() or rows.dtype == torch.bool:
                raise FastFTValueError(
                    f"gather: rows must be integer sample indices, got {rows.dtype}."
                )
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
                raise FastFTIndexError(
                    f"gather: view {view} is outside the cache's {self.num_views} views."
                )
            if check_rows:
                self._check_rows(rows)
            return rows + view * self.num_rows
        view = torch.as_tensor(view).to(rows.device, torch.int64)
        if view.shape != rows.shape:
            raise FastFTValueError(
                f"gather: view has shape {tuple(view.shape)} but rows {tuple(rows.shape)}."
            )
        if check_rows:
            if view.numel() and (int(view.min()) < 0 or int(view.max()) >= self.num_views):
                raise FastFTIndexError(
                    f"gather: a view index is outside the cache's {self.num_views} views."
                )
            self._check_rows(rows)
        return rows + view * self.num_rows

    def _check_rows(self, rows: torch.Tensor) -> None:
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            bad = int(((rows < 0) | (rows >= self.num_rows)).nonzero()[0, 0])
            raise FastFTIndexError(
                f"gather: rows[{bad}] = {int(rows[bad])} is outside the cache's {self.num_rows} "
                "samples."
            )

    def gather(
        self,
        rows,
        *,
        view: int | torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, ...]:
        """Rows ``rows[B]`` of every tap as ``[B, D]`` tensors (dequantized; a non-float tap is
        cast from its exact fp32 copy, see :meth:`gather_shaped` for its own dtype).

        Args:
            rows: the row indices (an integer tensor or sequence, ``0 <= row < num_rows``).
            view: one view index for all rows, an int64 tensor ``[B]`` of view indices, or
                None for view 0 (default).
            out_dtype: the dtype of the returned tensors (default ``torch.float32``).
        """
        return tuple(
            x if tap.source_dtype is None else x.to(out_dtype)
            for x, tap in zip(self._gather(rows, view, out_dtype), self.taps)
        )

    def _gather(
        self, rows, view, out_dtype: torch.dtype, check_rows: bool = True
    ) -> list[torch.Tensor]:
        # A non-float tap is read in fp32, which holds its integers exactly: bf16 rounds token
        # ids above 256 (fp16 above 2048) to their neighbours.
        physical = self._physical_rows(rows, view, check_rows)
        if self._verifier is not None:
            self._verifier.check(physical)  # a chunk's checksums before its first row is used
        return [
            torch.ops.fastft.cache_gather(
                s.data, s.scales, physical, out_dtype if tap.source_dtype is None else torch.float32
            )
            for s, tap in zip(self._storages, self.taps)
        ]

    def gather_shaped(
        self,
        rows,
        *,
        view: int | torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
        check_rows: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`gather` with each tap reshaped to ``[B, *tap.shape]``, as the tail takes it.

        Args:
            rows, view, out_dtype: as in :meth:`gather`.
            check_rows: check the range of ``rows`` and ``view`` here (default True); False
                skips it (each check reads a value back to the host: a synchronisation on
                CUDA) for indices valid by construction. The kernels still check every
                physical row they read.
        """
        out = self._gather(rows, view, out_dtype, check_rows)
        # A non-float tap (a mask, token ids) goes back to its own dtype: it is exact in fp32.
        return tuple(
            x.view(x.shape[0], *tap.shape)
            if tap.source_dtype is None
            else x.view(x.shape[0], *tap.shape).to(tap.source_dtype)
            for x, tap in zip(out, self.taps)
        )

    # ------------------------------------------------------------------ management
    @property
    def nbytes(self) -> int:
        """Bytes of the cached features, scales and labels."""
        return (
            sum(s.nbytes for s in self._storages) + self.labels.numel() * self.labels.element_size()
        )

    def verify(self) -> dict:
        """Check a disk cache's sizes and every chunk checksum (CacheCorruptError on a
        mismatch); in-memory caches have no stored bytes to check and report so."""
        if self.path is None:
            return {
                "fingerprint": self.fingerprint,
                "tier": self.tier,
                "ok": True,
                "checked": "nothing: in-memory caches are not checksummed",
            }
        return verify_folder(self.path)

    def __repr__(self) -> str:
        taps = ", ".join(f"{t.name}{list(t.shape)}:{dtype_str(t.dtype)}" for t in self.taps)
        return (
            f"FeatureCache({self.fingerprint[:12]}, tier={self.tier}, rows={self.num_rows}, "
            f"views={self.num_views}, taps=[{taps}], {self.nbytes / 2**20:.1f} MiB)"
        )

    @contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Inside, gathers on CUDA check their rows without a host synchronisation per call;
        a bad row raises when the block ends (see :func:`fastft.ops.deferred_row_checks`).
        For loops whose rows are valid by construction (a permutation of the cache's rows)."""
        with deferred_row_checks():
            yield


def open_folder(
    folder: Path,
    telemetry: dict | None = None,
    *,
    expected: str | None = None,
    verified: bool = False,
) -> Store:
    """Map a complete cache folder, read-only.

    Checked: the manifest (valid, complete, its fingerprint that of the folder and, when
    given, the ``expected`` key), every file's size, the labels' checksums; the features'
    checksums are checked before they are first read in this process (at once for caches
    up to ``journal.VERIFY_AT_OPEN_BYTES``, chunk by chunk on first read for larger ones).
    Raises CacheCorruptError when a check fails. ``verified``: the caller has just built
    the cache and checksummed its bytes in this process (no second pass over them).
    """
    ensure_real_folder(folder)
    manifest = disk.read_manifest(folder)
    if manifest["fingerprint"] != folder.name or (
        expected is not None and manifest["fingerprint"] != expected
    ):
        raise CacheCorruptError(
            f"cache folder {folder} holds a manifest of cache {manifest['fingerprint'][:12]}"
            + (
                f", not of the key asked for ({expected[:12]})"
                if expected and expected != folder.name
                else ""
            )
            + ": a cache folder is named by its own fingerprint. Remove it and build again."
        )
    if manifest.get("status") != "complete":
        if is_being_built(folder.parent, folder.name):
            raise CacheError(
                f"cache {folder.name} is incomplete: another process is building it now. Wait for "
                "it, or call FeatureCache.build with the same arguments, which waits and then "
                "reuses it."
            )
        raise CacheError(
            f"cache {folder.name} is incomplete (an interrupted build); build it again to resume."
        )
    disk.check_sizes(folder, manifest)
    tensors = {a.name: disk.map_array(folder, a, writable=False) for a in disk.arrays(manifest)}
    verifier = None if verified else ChunkVerifier(folder, manifest, tensors)  # checks the labels
    taps = [TapInfo.from_json(t) for t in manifest["taps"]]
    empty = torch.empty(0, dtype=torch.float32)
    storages = [TapStorage(tensors[t.name], tensors.get(t.name + ".scales", empty)) for t in taps]
    if verifier is not None and sum(s.nbytes for s in storages) <= journal.VERIFY_AT_OPEN_BYTES:
        verifier.check_all()
    labels = tensors["labels"].clone()  # small, and writable like those of the other tiers
    nbytes = sum(s.nbytes for s in storages) + labels.numel() * labels.element_size()
    info = {
        "rows": manifest["num_rows"] * manifest["num_views"],
        "bytes": {"disk": nbytes},
        "build_seconds": 0.0,
        "prefix_seconds": 0.0,
        "write_seconds": 0.0,
    }
    info.update(telemetry or {})
    cache = Store(
        fingerprint=manifest["fingerprint"],
        parts=manifest["parts"],
        tier="disk",
        taps=taps,
        storages=storages,
        labels=labels,
        num_rows=manifest["num_rows"],
        num_views=manifest["num_views"],
        path=folder,
        telemetry=info,
    )
    cache._verifier = None if verifier is None or verifier.done else verifier
    return cache
