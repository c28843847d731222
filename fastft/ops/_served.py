"""Which implementation served each fastft op call; read through :func:`fastft.ops.backend_calls`.

Every implementation records itself once it has accepted a call's arguments: the
pure-PyTorch ``"reference"``, and fastft._C's ``"cpu"`` and ``"cuda"`` kernels. A counter
bump under a lock costs well under a microsecond, against a kernel call of many.
"""

from __future__ import annotations

import threading
from collections import Counter

#: The implementations that may serve a fastft op.
BACKENDS = ("reference", "cpu", "cuda")

_calls: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()


def record(op: str, backend: str) -> None:
    """Count one call of ``op`` served by ``backend`` (one of :data:`BACKENDS`)."""
    with _lock:
        _calls[(op, backend)] += 1


def snapshot(reset: bool = False) -> dict[tuple[str, str], int]:
    """The counts so far, {(op, backend): calls}; cleared afterwards when ``reset``."""
    with _lock:
        out = dict(_calls)
        if reset:
            _calls.clear()
    return out
