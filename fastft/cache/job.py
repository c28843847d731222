"""Running a build: the :class:`Job` of one key, and :func:`run_chunks`, the loop that drives
a :class:`~fastft.cache.writer.Writer` over the chunks a build still needs, whatever the tier.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastft.cache import disk, folders, journal
from fastft.cache.fingerprint import CacheKey, finish_key
from fastft.cache.staging import staged
from fastft.cache.store import Store, open_folder
from fastft.cache.telemetry import telemetry
from fastft.cache.writer import Probe, Settings, Writer, chunks
from fastft.data.source_base import DIGEST_BYTES, Chunk, Source
from fastft.errors import CacheError

__all__ = ["Job", "Pending", "run_chunks", "progress_bar"]


# ---------------------------------------------------------------------------- running
def progress_bar(s: Settings, total: int, done: int):
    """The build's bar (on a terminal, when ``s.progress``), labelled ``s.progress`` when that
    is a string (``"train cache"``, ``"val cache"``)."""
    from tqdm.auto import tqdm

    enabled = bool(s.progress) and sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=done,
        unit="rows",
        unit_scale=True,
        desc=s.progress if isinstance(s.progress, str) else "fastft cache",
        disable=not enabled,
        dynamic_ncols=True,
    )


def run_chunks(
    writer: Writer,
    source: Source,
    probe: Probe | None,
    skip: Callable[[int, int, int], bool],
    on_done: Callable[[Chunk], None],
    done: int,
    *,
    share: bool = False,
) -> int:
    """Forward and write every chunk not skipped; ``on_done`` after each written chunk.
    Returns the number of rows written. ``share``: the chunks are one rank's share of a
    sharded build (its progress bar counts rows, with no total)."""
    s, n = writer.s, writer.n
    bar = progress_bar(s, None if share else n * s.views, done)
    written = 0
    probed: list[Chunk] = []  # the probe's chunk when it is to be written: not read again

    def plan(view: int, start: int, count: int) -> bool:
        if skip(view, start, count):  # asked once per chunk, in order (see Source.chunks)
            return True
        if probe is not None and (view, start, count) == (0, 0, probe.chunk.count):
            probed.append(probe.chunk)
            return True
        return False

    def ready():
        for chunk in staged(chunks(source, s, plan), s.device):
            while probed:
                yield probed.pop(), (probe.names, probe.tensors, probe.inputs, probe.labels)
            yield chunk, None
        while probed:
            yield probed.pop(), (probe.names, probe.tensors, probe.inputs, probe.labels)

    try:
        for chunk, computed in ready():
            names, tensors, inputs, labels = computed or writer.forward(chunk)
            writer.write(chunk, names, tensors, inputs, labels)
            on_done(chunk)
            bar.update(chunk.count)
            written += chunk.count
    finally:
        bar.close()
    source.check_unchanged()
    return written


# ---------------------------------------------------------------------------- pending keys
class Pending:
    """A build whose data are hashed while it runs (a pending key, see
    :func:`~fastft.cache.fingerprint.make_key`): on disk it is built in the folder named by
    the pending key, with the digests of the samples it read committed beside each journal
    commit (``units.bin``); a resume reads the data once to hash them, keeps only the chunks
    whose samples hash as they did, and the complete folder is renamed to its key."""

    def __init__(self, key: CacheKey, source: Source):
        self.key, self.source = key, source
        self.final: CacheKey | None = None

    def finish(self) -> CacheKey:
        """The complete key, from the digests of every sample read."""
        if self.final is None:
            self.final = finish_key(self.key, self.source)
        return self.final

    def on_commit(self, folder: Path) -> None:
        """Make the digests of the samples read so far durable (before the journal names the
        chunks written from them)."""
        state = self.source.digest_state()
        if state is not None:
            digests, known = state
            payload = known.astype(np.uint8).tobytes() + np.ascontiguousarray(digests).tobytes()
            _write_durable(folder / UNITS, payload)

    def on_resume(self, folder: Path, committed: journal.Journal, s: Settings) -> None:
        """Hash the data now (one read) and forget every committed chunk whose samples do not
        hash as they did when it was written (all of them when the digests are unreadable)."""
        self.source.content_key(s.batch_size, s.num_workers)
        now, _ = self.source.digest_state()
        units = len(now)
        try:
            raw = (folder / UNITS).read_bytes()
            if len(raw) != units * (1 + DIGEST_BYTES):
                raise ValueError("size")
            known = np.frombuffer(raw[:units], dtype=np.uint8).astype(bool)
            then = np.frombuffer(raw[units:], dtype=np.uint8).reshape(units, DIGEST_BYTES)
        except (OSError, ValueError):
            known, then = np.zeros(units, dtype=bool), now
        for (view, start), (count, _) in list(committed.chunks.items()):
            unit = self.source.units_of(start, count)
            if not (known[unit].all() and np.array_equal(then[unit], now[unit])):
                committed.drop(view, start)

    def publish(self, job: Job, cache: Store) -> Store:
        """The complete pending folder renamed to its key's (under that key's build lock);
        the cache already there when another process completed it first."""
        key = self.finish()
        folder, final = job.folder, job.s.root / key.fingerprint
        telemetry = cache.telemetry
        del cache  # its mappings of the pending folder's files
        with folders.build_lock(job.s.root, key.fingerprint):
            done = complete_of(final)
            if done is not None:
                folders.discard_folder(folder)
                return done.with_telemetry(**telemetry)
            if final.exists():  # an interrupted build of the same key: this one is complete
                folders.discard_folder(final)
            manifest = disk.read_manifest(folder)
            manifest.update(fingerprint=key.fingerprint, parts=key.parts)
            (folder / UNITS).unlink(missing_ok=True)
            disk.write_json_atomic(folder / disk.MANIFEST, manifest)
            os.replace(folder, final)
            disk.fsync_dir(final.parent)
        job.fp, job.parts = key.fingerprint, key.parts
        return open_folder(final, telemetry=telemetry, verified=True)


#: The digests of a pending disk build's samples: one byte per unit (read or not), then the
#: unit digests.
UNITS = "units.bin"


def _write_durable(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb", opener=lambda name, flags: disk.open_nofollow(Path(name), flags)) as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_of(folder: Path) -> Store | None:
    """The complete cache in ``folder``, else None."""
    if not (folder / disk.MANIFEST).is_file():
        return None
    try:
        if disk.read_manifest(folder).get("status") == "complete":
            return open_folder(folder)
    except CacheError:
        pass
    return None


# ---------------------------------------------------------------------------- a build's job
@dataclass
class Job:
    """One build of one key: the writer (prefix, settings, timer), the data, the key and why
    it is built."""

    writer: Writer
    source: Source
    fp: str
    parts: dict
    reason: str
    t_start: float
    #: The data are hashed while this build runs (its key is pending, see :class:`Pending`).
    pending: Pending | None = None

    @property
    def s(self) -> Settings:
        return self.writer.s

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def folder(self) -> Path:
        return self.writer.s.root / self.fp

    def telemetry(self, tier: str, nbytes: int, **extra) -> dict:
        """This build's telemetry (see :func:`telemetry`)."""
        return telemetry(
            self.writer.timer,
            tier,
            nbytes,
            self.t_start,
            self.reason,
            self.n * self.s.views,
            **extra,
        )
