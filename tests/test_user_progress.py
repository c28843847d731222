"""What a fit shows while it runs.

Off a terminal (a log file, nohup, CI, a notebook) each epoch is one INFO line of the
``"fastft.train"`` logger with the loss, the validation metrics and the seconds; a program
that configured no logging still sees it on stderr. On a terminal the same summary is the
postfix of the epochs bar, which stays at the end, and the cache bars say which cache they
build. ``verbose=False`` shows nothing; the ``"fastft"`` logger's level silences the lines.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys

from fastft import FineTuner
from fastft.cache import clear_registry
from fastft.logs import ensure_visible

from helpers.data import mlp_data
from helpers.models import make_mlp

NUMBER = r"[-+\d.e]+"
EPOCH_LINE = re.compile(
    rf"^epoch (\d+)/(\d+): loss {NUMBER}, val_loss {NUMBER}, val_accuracy {NUMBER}.* \(\d+\.\d s\)$"
)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def fit(epochs=3, seed=1, **tuner):
    """A small fit with validation data on fresh caches (no hit from another test)."""
    clear_registry()
    train, val = mlp_data(64, seed=seed), mlp_data(32, seed=seed + 100)
    ft = FineTuner(make_mlp(), num_classes=3, cache="host", **tuner)
    ft.fit(train, val=val, epochs=epochs, batch_size=16)
    return ft


@contextlib.contextmanager
def unconfigured():
    """A program that configured no logging: no handler on the root logger (pytest's are put
    back at the end), and the ``"fastft"`` logger as an import leaves it."""
    root, pkg = logging.getLogger(), logging.getLogger("fastft")
    saved = root.handlers[:], pkg.handlers[:], pkg.level
    root.handlers.clear()
    pkg.handlers.clear()
    pkg.setLevel(logging.NOTSET)
    try:
        yield pkg
    finally:
        root.handlers[:], pkg.handlers[:] = saved[0], saved[1]
        pkg.setLevel(saved[2])


def test_off_a_terminal_each_epoch_is_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="fastft.train")
    ft = fit(epochs=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "fastft.train"]
    assert len(lines) == 3, lines
    for i, (line, record) in enumerate(zip(lines, ft.history)):
        m = EPOCH_LINE.match(line)
        assert m, line
        assert (int(m[1]), int(m[2])) == (i + 1, 3)
        assert f"loss {record['loss']:.4g}" in line
        assert f"val_accuracy {record['val_accuracy']:.4g}" in line
        assert "val_macro_f1" in line


def test_lines_reach_stderr_when_nothing_configured_logging(capsys):
    with unconfigured():
        fit(epochs=2)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fastft.train: epoch ")]
    assert [ln.split(":")[1].split()[1] for ln in lines] == ["1/2", "2/2"], err
    assert "\r" not in err  # no bar off a terminal


def test_ensure_visible_adds_one_handler_and_stands_down_for_the_programs_config():
    with unconfigured() as pkg:
        ensure_visible()
        ensure_visible()
        assert len(pkg.handlers) == 1
        assert pkg.getEffectiveLevel() == logging.INFO
        logging.getLogger().addHandler(logging.NullHandler())  # the program configures logging
        ensure_visible()
        assert pkg.handlers == []
        assert pkg.level == logging.NOTSET  # its configuration decides the level again


def test_a_level_the_user_set_is_kept():
    with unconfigured() as pkg:
        pkg.setLevel(logging.WARNING)
        ensure_visible()
        assert pkg.level == logging.WARNING


def test_the_fastft_logger_level_silences_the_lines(caplog):
    caplog.set_level(logging.INFO)  # the root logger: everything at INFO
    caplog.set_level(logging.WARNING, logger="fastft")  # what the README says to do
    fit(epochs=2)
    assert [r for r in caplog.records if r.name.startswith("fastft.train")] == []


def test_verbose_false_shows_nothing(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fastft.train")
    monkeypatch.setattr(sys, "stderr", Terminal())
    fit(epochs=2, verbose=False)
    assert [r for r in caplog.records if r.name == "fastft.train"] == []
    assert sys.stderr.getvalue() == ""


def test_on_a_terminal_the_bar_shows_loss_and_val_metrics_and_stays(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fastft.train")
    monkeypatch.setattr(sys, "stderr", Terminal())
    ft = fit(epochs=3, seed=7)
    out = sys.stderr.getvalue()
    assert [r for r in caplog.records if r.name == "fastft.train"] == []  # the bar instead
    last = out.split("\r")[-1]  # the bar's final state, as it stays on screen
    assert last.startswith("fastft fit") and "3/3" in last, out
    assert f"loss={ft.history[-1]['loss']:.4g}" in last
    assert f"val_accuracy={ft.history[-1]['val_accuracy']:.4g}" in last
    assert last.endswith("\n")  # left on screen (a bar that vanishes ends in blanks)


def test_cache_bars_say_which_cache_they_build(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    fit(epochs=1, seed=11)
    labels = {seg.split(":")[0] for seg in sys.stderr.getvalue().split("\r") if "cache" in seg}
    assert {lab.strip() for lab in labels} >= {"train cache", "val cache"}, labels
    assert not any("fastft cache" in lab for lab in labels)
