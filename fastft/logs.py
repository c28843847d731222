"""fastft's log lines (per-epoch summaries, cache decisions): visible without any setup.

fastft logs through the standard :mod:`logging` loggers under ``"fastft"`` (``"fastft.train"``,
``"fastft.cache"``). A program that configured no logging would see none of its INFO lines,
so :func:`ensure_visible` gives the ``"fastft"`` logger one plain stderr handler at INFO, and
only then: once the program (or pytest, or Jupyter) puts a handler on the root logger or on
``"fastft"``, its configuration decides. To silence the lines:
``logging.getLogger("fastft").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["ensure_visible"]

ROOT_LOGGER = "fastft"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is written (pytest and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.set_level = False  # whether ensure_visible set the logger's level with it

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr wins
        pass


def ensure_visible() -> None:
    """Make fastft's INFO lines reach stderr when nobody configured logging (idempotent).

    Adds one stderr handler to the ``"fastft"`` logger, and sets that logger to INFO when its
    level was never set, if neither it nor the root logger has a handler. Undoes both once the
    root logger has a handler (the lines would otherwise be printed twice).
    """
    pkg = logging.getLogger(ROOT_LOGGER)
    ours = [h for h in pkg.handlers if isinstance(h, _StderrHandler)]
    if logging.getLogger().handlers:
        for handler in ours:
            pkg.removeHandler(handler)
            if handler.set_level and pkg.level == logging.INFO:
                pkg.setLevel(logging.NOTSET)  # the program's configuration decides again
        return
    if pkg.handlers:
        return
    handler = _StderrHandler()
    if pkg.level == logging.NOTSET:
        pkg.setLevel(logging.INFO)
        handler.set_level = True
    pkg.addHandler(handler)
