"""What a build reports: the time it spent (:class:`Timer`), its ``cache.telemetry``, and the
one log line that says what it did (:func:`announce`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule

from fastft.cache.fingerprint import PART_NAMES
from fastft.cache.layout import dtype_name
from fastft.distributed import rank_and_world
from fastft.logs import ensure_visible

__all__ = ["Timer", "telemetry", "hit_telemetry", "decision", "announce"]


@dataclass
class Timer:
    """What a build spent: seconds in the prefix and in writes, prefix calls, rows written."""

    prefix: float = 0.0
    write: float = 0.0
    prefix_calls: int = 0
    rows_written: int = 0


def telemetry(
    timer: Timer, tier: str, nbytes: int, t_start: float, reason: str, rows: int, **extra
) -> dict:
    """What a build reports in ``cache.telemetry`` (a build that computed rows)."""
    return {
        "rows": rows,
        "bytes": {tier: nbytes},
        "build_seconds": time.perf_counter() - t_start,
        "prefix_seconds": timer.prefix,
        "write_seconds": timer.write,
        "hit": False,
        "reason": reason,
        "prefix_calls": timer.prefix_calls,
        "rows_computed": timer.rows_written,
        **extra,
    }


def hit_telemetry(
    t_start: float, reason: str, prefix_seconds: float = 0.0, prefix_calls: int = 0
) -> dict:
    """What a reuse reports (nothing written; a probe may have run the prefix once)."""
    return {
        "hit": True,
        "reason": reason,
        "build_seconds": time.perf_counter() - t_start,
        "prefix_seconds": prefix_seconds,
        "write_seconds": 0.0,
        "prefix_calls": prefix_calls,
        "rows_computed": 0,
    }


# ---------------------------------------------------------------------------- the log line
log = logging.getLogger("fastft.cache")


def size_text(nbytes: float) -> str:
    """``nbytes`` in MiB, with the digits that matter (``'0.012 MiB'``, ``'3.4 MiB'``,
    ``'512 MiB'``)."""
    mib = nbytes / 2**20
    return f"{mib:.0f} MiB" if mib >= 100 else f"{mib:.1f} MiB" if mib >= 1 else f"{mib:.3f} MiB"


def shape_text(num_rows: int, num_views: int, shapes: list) -> str:
    """Rows × each tap's per-sample shape: ``'1500x512'``, ``'1500x16x384, 1500x16'``; with
    views, ``'1500x512 (x2 views)'``."""
    text = ", ".join("x".join(str(d) for d in (num_rows, *shape)) for shape in shapes)
    return text + (f" (x{num_views} views)" if num_views > 1 else "")


def _dtype_of(cache: Any) -> str:
    floats = [t.dtype for t in cache.taps if t.source_dtype is None] or [cache.taps[0].dtype]
    return dtype_name(floats[0])


def _where(cache: Any, built: bool) -> str:
    if cache.path is not None:
        return f"disk at {cache.path}" if built else f"on disk at {cache.path}"
    device = cache.storages[0].data.device if cache.storages else None
    memory = "host memory" if device is None or device.type == "cpu" else f"{device} memory"
    return memory if built else f"in {memory}"


def describes(prefix: Any, source: Any) -> dict:
    """What a cache is of, for people (``fastft cache info``): the model and its cut, the
    data and their size. Not part of the key, which covers all of it by content."""
    body = getattr(prefix, "body", None)
    module = body if body is not None else prefix
    model = type(module).__name__
    if isinstance(module, GraphModule):  # an fx split: the classes of what it calls
        names = list(dict.fromkeys(type(m).__name__ for m in module.children()))
        model = " + ".join(names[:4]) + (" + ..." if len(names) > 4 else "") or model
    taps = getattr(prefix, "tap_names", None)
    if taps:
        model += f" cut at {', '.join(map(str, taps))}"
    params = sum(p.numel() for p in prefix.parameters())
    model += f" ({params:,} frozen parameters)"
    data = f"{getattr(source, 'description', 'the data')}, {source.n} samples"
    return {"model": model, "data": data}


def because(reason: str) -> str:
    """A telemetry reason as the log line says it: ``'rebuilt: the frozen weights changed'``
    reads ``'rebuilt because the frozen weights changed'``; a cache whose nearest one differs
    only in its data is new data as often as changed data (a val set), and says both."""
    if reason == f"rebuilt: {PART_NAMES['dataset']} changed":
        return "no cache of these data yet: new data, or the data changed"
    return "rebuilt because " + reason[9:] if reason.startswith("rebuilt: ") else reason


def decision(cache: Any, name: str = "cache") -> str:
    """The one line that says what a build did: ``'train cache: hit on disk at … (3.1 MiB,
    fp16, 1500x512)'`` or ``'train cache: built in 2.0 s, 3.1 MiB, fp16, 1500x512, disk at …
    (rebuilt because the frozen weights changed)'``."""
    t = cache.telemetry
    shapes = shape_text(cache.num_rows, cache.num_views, [tuple(tap.shape) for tap in cache.taps])
    size, dtype = size_text(cache.nbytes), _dtype_of(cache)
    reason = str(t.get("reason") or "")
    if t.get("hit"):
        how = f", {reason[5:]}" if reason.startswith("hit: ") else ""
        return f"{name}: hit {_where(cache, built=False)}{how} ({size}, {dtype}, {shapes})"
    return (
        f"{name}: built in {t.get('build_seconds', 0.0):.1f} s, {size}, {dtype}, {shapes}, "
        f"{_where(cache, built=True)} ({because(reason)})"
    )


def announce(cache: Any, name: str = "cache", *, quiet: bool = False) -> None:
    """Log :func:`decision` once on ``"fastft.cache"`` (rank 0 of a process group only): at
    INFO, visible without any logging setup (see :mod:`fastft.logs`) and silenced by
    ``logging.getLogger("fastft").setLevel(logging.WARNING)``; at DEBUG when ``quiet`` (a
    build asked for no progress output)."""
    if rank_and_world()[0] != 0:
        return
    level = logging.DEBUG if quiet else logging.INFO
    if not quiet:
        ensure_visible()
    if log.isEnabledFor(level):
        log.log(level, "%s", decision(cache, name))
