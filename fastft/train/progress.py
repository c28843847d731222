"""What a fit shows while it runs: one summary per epoch (loss, validation metrics, seconds).

On a terminal the summary is the postfix of the epochs bar, which stays on screen at the end.
Elsewhere (a log file, nohup, CI, a notebook) there is no bar, and each epoch is one INFO line
of the ``"fastft.train"`` logger, e.g. ``epoch 3/10: loss 0.4127, val_loss 0.5210,
val_accuracy 0.8125 (1.2 s)``; :func:`fastft.logs.ensure_visible` makes it reach stderr when
the program configured no logging. ``FineTuner(verbose=False)`` shows neither;
``logging.getLogger("fastft").setLevel(logging.WARNING)`` silences the lines alone.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

from fastft.logs import ensure_visible

__all__ = ["EpochProgress", "on_terminal", "summary", "summary_line", "unfrozen"]

log = logging.getLogger("fastft.train")


def on_terminal() -> bool:
    """Whether stderr is a terminal (bars are drawn only there)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def summary(record: dict) -> dict[str, str]:
    """An epoch's record as shown: the training loss and every ``val_*`` metric."""
    shown = {k: v for k, v in record.items() if k == "loss" or k.startswith("val_")}
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in shown.items()}


def unfrozen(blocks: int | None) -> str:
    """`` (2 blocks unfrozen)``, or nothing for a stage that trains the new layers alone."""
    return f" ({blocks} block{'s' * (blocks != 1)} unfrozen)" if blocks else ""


def summary_line(record: dict, epochs: int) -> str:
    """``epoch i/n: loss …, val_… (s)`` for one epoch of a fit of ``epochs`` epochs."""
    stage = unfrozen(record.get("unfrozen_blocks"))
    fields = ", ".join(f"{k} {v}" for k, v in summary(record).items())
    return f"epoch {record['epoch']}/{epochs}{stage}: {fields} ({record['seconds']:.1f} s)"


class EpochProgress:
    """The progress of one stage of a fit: a bar on a terminal, else one log line per epoch.

    ``epochs``: the stage's epochs, ``done`` of them already done (a resumed fit);
    ``fit_epochs``: the whole fit's, the ``n`` of ``epoch i/n``; ``enabled``: the tuner's
    ``verbose``; ``unfrozen_blocks``: the stage's, named in the bar's label.
    """

    def __init__(
        self, *, epochs: int, done: int, fit_epochs: int, enabled: bool, unfrozen_blocks: int = 0
    ):
        terminal = on_terminal()
        self.fit_epochs = fit_epochs
        self.lines = enabled and not terminal
        self.bar = tqdm(
            total=epochs,
            initial=done,
            desc="fastft fit" + unfrozen(unfrozen_blocks),
            unit="epoch",
            disable=not (enabled and terminal),
            leave=True,
            dynamic_ncols=True,
        )
        if self.lines:
            ensure_visible()

    def epoch_done(self, record: dict) -> None:
        """Show the summary of an epoch's history record."""
        if not self.bar.disable:
            self.bar.set_postfix(summary(record), refresh=False)
            self.bar.update(1)
        if self.lines:
            log.info(summary_line(record, self.fit_epochs))

    def close(self) -> None:
        self.bar.close()
