"""What a build reports: the time it spent (:class:`Timer`) and its ``cache.telemetry``."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Timer", "telemetry", "hit_telemetry"]


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
