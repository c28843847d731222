"""The benchmark tests' own clock: intervals of the calls a test wraps, on its perf_counter.

A benchmark reports times it measured itself; a test that recomputes its speed-up from those
times checks nothing but the formula. :class:`Clock` records, on the test's clock, when each
wrapped call ran, so a test can bound every reported time from both sides without trusting
it: at most the wall time of the stretch that must contain it (less the evaluations the
benchmark says it left out), at least the time spent in the work it must include (loop
bodies, cache builds, epochs). Both bounds hold whatever the load on the machine: they are
containments, not "X is faster than Y".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Span:
    name: str
    start: float
    end: float
    info: Any = None

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def inside(self, other: Span) -> bool:
        return other.start <= self.start and self.end <= other.end


@dataclass
class Clock:
    spans: list[Span] = field(default_factory=list)

    def wrap(self, name: str, fn: Callable, info: Callable[..., Any] | None = None) -> Callable:
        """``fn`` timed: each call adds a Span ``name`` (``info(*args, **kwargs)`` kept)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append(
                    Span(name, start, time.perf_counter(), info and info(*args, **kwargs))
                )

        return timed

    def loop(self, name: str) -> Callable[..., Iterator]:
        """A stand-in for ``tqdm(iterable, **options)`` that adds a Span ``name`` for each
        loop body (from handing out an item to being asked for the next), ``desc`` as info."""

        def iterate(iterable: Iterable, *args, desc: str = "", **options) -> Iterator:
            for item in iterable:
                start = time.perf_counter()
                yield item
                self.spans.append(Span(name, start, time.perf_counter(), desc))

        return iterate

    def find(
        self, name: str, within: Span | None = None, outside: Iterable[Span] = ()
    ) -> list[Span]:
        """The ``name`` spans inside ``within`` and in none of ``outside``, in start order."""
        outside = list(outside)
        found = [
            s
            for s in self.spans
            if s.name == name
            and (within is None or s.inside(within))
            and not any(s.inside(o) for o in outside)
        ]
        return sorted(found, key=lambda s: s.start)


def busy(spans: Iterable[Span], before: float = float("inf")) -> float:
    """Seconds covered by ``spans`` (overlaps counted once), of those ended by ``before``."""
    total, reach = 0.0, float("-inf")
    for s in sorted((s for s in spans if s.end <= before), key=lambda s: s.start):
        if s.end > reach:
            total += s.end - max(s.start, reach)
            reach = s.end
    return total
