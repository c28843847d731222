"""Running a build: the :class:`Job` of one key, and :func:`run_chunks`, the loop that drives
a :class:`~fastft.cache.writer.Writer` over the chunks a build still needs, whatever the tier.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastft.cache.staging import staged
from fastft.cache.telemetry import telemetry
from fastft.cache.writer import Probe, Settings, Writer, chunks
from fastft.data.source_base import Chunk, Source

__all__ = ["Job", "run_chunks", "progress_bar"]


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
    #: Called before a build goes to disk, whose folder is named by the complete key (a
    #: pending key is completed by it: see :func:`fastft.cache.fingerprint.make_key`).
    before_disk: Callable[[], None] | None = None

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
