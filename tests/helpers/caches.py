"""Cache builds the cache tests share, what a cache must hold, and the trust scenarios.

- :func:`build_host` — an fp32 cache in memory, batches of 8 (the cache-key tests).
- :func:`build_on_disk` — an fp32 cache on disk, batches of 10 (the disk tests).
- :func:`expected_rows`, :func:`assert_holds` — a cache holds ``prefix(transform(X))`` now.
- :class:`Scenario`, :func:`assert_change_is_seen` — a build, and a change that must
  rebuild it (the test_trust_key* scenarios).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastft.cache import FeatureCache

from helpers.data import labelled


# ---------------------------------------------------------------------------- builds
def build_host(prefix, data, tmp_path, **kw):
    kw.setdefault("batch_size", 8)
    return FeatureCache.build(
        prefix, data, dtype="fp32", tier="host", cache_dir=tmp_path, progress=False, **kw
    )


def build_on_disk(prefix, data, cache_dir, **kw):
    return FeatureCache.build(
        prefix,
        data,
        tier="disk",
        dtype="fp32",
        batch_size=10,
        cache_dir=cache_dir,
        progress=False,
        **kw,
    )


# ---------------------------------------------------------------------------- what a cache holds
def expected_rows(prefix, X, transform=None, batch=8):
    """What a cache of ``prefix`` over ``X`` must hold now: the prefix in eval mode on the
    transformed inputs (a batch at a time, as the build runs it)."""
    prefix.eval()
    with torch.no_grad():
        return torch.cat([prefix(transform(x) if transform else x) for x in X.split(batch)])


def assert_holds(cache, prefix, X, transform=None, batch=8):
    (rows,) = cache.gather(torch.arange(len(X)))
    torch.testing.assert_close(rows, expected_rows(prefix, X, transform, batch), rtol=0, atol=0)


# ---------------------------------------------------------------------------- trust scenarios
@dataclass
class Scenario:
    """A build (``prefix`` over ``X`` with ``kwargs``) and a ``change`` that must be seen. The
    change returns the build kwargs to use afterwards (anything else: the same kwargs)."""

    prefix: nn.Module
    change: Callable[[Scenario], dict | None]
    kwargs: dict = field(default_factory=dict)
    X: torch.Tensor = None
    y: torch.Tensor = None
    undo: Callable[[], None] = lambda: None
    random: bool = False  # the transform draws: its rows are one seeded draw, not comparable

    def __post_init__(self):
        if self.X is None:
            self.X, self.y = labelled(24)


def assert_change_is_seen(s: Scenario, tmp_path) -> None:
    """Built twice unchanged: reused. Changed: rebuilt, holding what the prefix computes now.
    Built again: reused. ``s.undo()`` runs in any case."""
    try:
        first = build_host(s.prefix, (s.X, s.y), tmp_path, **s.kwargs)
        if not s.random:
            assert_holds(first, s.prefix, s.X, s.kwargs.get("transform"))
        again = build_host(s.prefix, (s.X, s.y), tmp_path, **s.kwargs)
        assert again.telemetry["hit"] is True  # nothing changed: reused
        changed = s.change(s)
        kwargs = changed if isinstance(changed, dict) else s.kwargs
        rebuilt = build_host(s.prefix, (s.X, s.y), tmp_path, **kwargs)
        assert rebuilt.telemetry["hit"] is False, rebuilt.telemetry["reason"]
        assert rebuilt.telemetry["reason"].startswith("rebuilt: ")
        if not s.random:
            transform, batch = kwargs.get("transform"), kwargs.get("batch_size", 8)
            assert_holds(rebuilt, s.prefix, s.X, transform, batch)
        assert build_host(s.prefix, (s.X, s.y), tmp_path, **kwargs).telemetry["hit"] is True
    finally:
        s.undo()
