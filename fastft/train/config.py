"""What a fit is told: its hyper-parameters, its stages, when to stop, and what it reports."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from fastft.errors import CallFormError, FastFTValueError
from fastft.train.objectives import LOSSES

OPTIMIZERS = ("adamw", "adam", "sgd")
#: optimizer="sgd" uses momentum 0.9 unless told otherwise (torch.optim.SGD's default is 0).
SGD_MOMENTUM = 0.9
SCHEDULERS = (None, "cosine", "onecycle")


@dataclass
class FitConfig:
    """Hyper-parameters of one ``fit`` (also what a checkpoint records).

    ``fit(train, config=FitConfig(epochs=5, lr=1e-2))`` is the same fit as
    ``fit(train, epochs=5, lr=1e-2)``.

    Attributes:
        epochs: epochs of the fit (default 10).
        batch_size: rows per step (default None: ``fit`` takes a DataLoader's own, else 256).
        lr: learning rate (default 1e-3).
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``.
        weight_decay: the optimizer's weight decay (default 0).
        momentum: SGD's momentum, 0.9 by default (torch's SGD has 0); another value with
            ``"adamw"`` or ``"adam"`` is refused (they use their betas).
        scheduler: None (constant lr, default), ``"cosine"`` or ``"onecycle"``, stepped per
            batch.
        loss: ``"ce"`` (default; class labels), ``"bce"`` (multi-label) or ``"mse"``.
        label_smoothing: of the ``"ce"`` loss (default 0).
        class_weights: per-class weights of the loss (default None).
        amp: ``"bf16"`` trains under bf16 autocast (default None: fp32).
        lr_decay: ``d`` gives each unfrozen block ``lr * d ** depth`` (default None: the
            same lr).
        cuda_graph: replay the training step as a CUDA graph (default False; see
            :meth:`FineTuner.fit`).
    """

    epochs: int = 10
    batch_size: int | None = None  # fit: a DataLoader's own batch size, else 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = SGD_MOMENTUM  # SGD only (torch.optim.SGD defaults to 0)
    scheduler: str | None = None
    loss: str = "ce"
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None
    amp: str | None = None
    lr_decay: float | None = None
    cuda_graph: bool = False

    def validate(self) -> None:
        """FastFTValueError naming the first setting out of range."""
        if int(self.epochs) < 1:
            raise FastFTValueError(f"epochs must be ≥ 1, got {self.epochs}.")
        if self.batch_size is None or int(self.batch_size) <= 0:
            raise FastFTValueError(f"batch_size must be a positive integer, got {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FastFTValueError(f"lr must be a finite number > 0, got {self.lr}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FastFTValueError(
                f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}."
            )
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise FastFTValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.momentum != SGD_MOMENTUM and self.optimizer != "sgd":
            raise FastFTValueError(
                f"momentum={self.momentum} applies to optimizer='sgd' only; "
                f"optimizer={self.optimizer!r} ignores it (Adam and AdamW use their betas, "
                "(0.9, 0.999)). Pass optimizer='sgd' with momentum=, or drop momentum=."
            )
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise FastFTValueError(
                f"label_smoothing must be in [0, 1), got {self.label_smoothing}."
            )
        if self.class_weights is not None and not all(
            math.isfinite(w) and w >= 0 for w in self.class_weights
        ):
            raise FastFTValueError(
                f"class_weights must be finite numbers ≥ 0, got {self.class_weights}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise FastFTValueError(
                f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}."
            )
        if self.scheduler not in SCHEDULERS:
            raise FastFTValueError(
                f"unknown scheduler {self.scheduler!r}; use None, 'cosine' or 'onecycle'."
            )
        if self.loss not in LOSSES:
            raise FastFTValueError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}.")
        if self.amp not in (None, "bf16"):
            raise FastFTValueError(f"amp must be None or 'bf16', got {self.amp!r}.")
        if self.lr_decay is not None and not (self.lr_decay > 0 and math.isfinite(self.lr_decay)):
            raise FastFTValueError(
                "lr_decay must be > 0 (e.g. 0.5 halves the rate per block going down), "
                f"got {self.lr_decay}."
            )

    def with_epochs(self, epochs: int) -> FitConfig:
        """The same settings for another number of epochs (one stage of a staged fit).

        Args:
            epochs: the number of epochs of the copy.
        """
        return dataclasses.replace(self, epochs=epochs)


#: The names of fit's keyword settings, which are FitConfig's fields.
FIT_SETTINGS = tuple(f.name for f in dataclasses.fields(FitConfig))


def resolve_fit_config(config: FitConfig | None, given: Mapping[str, Any], train: Any) -> FitConfig:
    """The validated FitConfig of a fit called with ``config=`` and/or keyword settings.

    ``given`` holds the keyword settings, None for those not passed. A setting passed both in
    ``config`` and as a keyword with another value is refused rather than one silently
    winning. Without a batch size, a DataLoader's own is used (else 256).
    """
    given = {k: v for k, v in given.items() if v is not None}
    if config is not None and not isinstance(config, FitConfig):
        raise FastFTValueError(
            f"config= takes a fastft.FitConfig, got {type(config).__name__}; or pass the settings "
            "as keywords: fit(train, epochs=5, lr=1e-2)."
        )
    if config is not None:
        clash = [k for k, v in given.items() if getattr(config, k) != v]
        if clash:
            raise FastFTValueError(
                f"fit() got config= and {', '.join(f'{k}=' for k in clash)} with other values; "
                "set each setting in one place."
            )
    values = {**dataclasses.asdict(config or FitConfig()), **given}
    values["batch_size"] = training_batch_size(train, values["batch_size"])
    if values["class_weights"] is not None:
        values["class_weights"] = [float(w) for w in values["class_weights"]]
    values["cuda_graph"] = bool(values["cuda_graph"])
    cfg = FitConfig(**values)
    cfg.validate()
    return cfg


def epochs_before(history: Sequence[dict], count: int) -> int:
    """The number of the last epoch among the first ``count`` records of ``history`` (0 for
    none): the epoch a new fit numbers its own after."""
    if count <= 0:
        return 0
    last = history[count - 1].get("epoch")
    return int(last) if isinstance(last, int) else count


class History(list):
    """Per-epoch records of a fit (a list of dicts) with a few conveniences."""

    def column(self, key: str) -> list[Any]:
        """The values of one key per epoch.

        Args:
            key: a record's key (``"loss"``, ``"val_accuracy"``, ...); None where an epoch
                does not report it.
        """
        return [r.get(key) for r in self]

    @property
    def best(self) -> dict[str, Any] | None:
        """The epoch of the lowest ``val_loss`` (``loss`` without validation data)."""
        key = "val_loss" if self and "val_loss" in self[-1] else "loss"
        return min(self, key=lambda r: r[key]) if self else None


#: Metric names ``mode="auto"`` maximises (any other name, a loss, is minimised).
_HIGHER_IS_BETTER = re.compile(r"acc|f1|auc|precision|recall|score|top\d", re.IGNORECASE)
MODES = ("auto", "min", "max")


def monitor_mode(monitor: str, mode: str = "auto") -> str:
    """``"max"`` or ``"min"``: ``mode`` itself, or for ``"auto"`` ``"max"`` when ``monitor``
    names a score (accuracy, acc, f1, auc, precision, recall, score, top5), else ``"min"``."""
    if mode not in MODES:
        raise FastFTValueError(
            f"EarlyStopping(mode={mode!r}): use 'min' (a loss), 'max' (accuracy, F1, ...) or "
            "'auto' (max for names holding accuracy/acc/f1/auc/precision/recall/score)."
        )
    if mode != "auto":
        return mode
    return "max" if _HIGHER_IS_BETTER.search(monitor) else "min"


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    Args:
        patience: epochs without improvement before training stops.
        monitor: the history key watched (``"val_loss"``, ``"val_accuracy"``, ``"loss"``, ...).
        min_delta: how much better than the best so far an epoch must be to count.
        restore_best: at the end of the fit, load the weights of the best epoch.
        mode: ``"min"`` (lower is better), ``"max"`` (higher is better) or ``"auto"`` (the
            default): ``"max"`` when ``monitor`` holds accuracy, acc, f1, auc, precision,
            recall, score or top5 (``val_accuracy``, ``val_macro_f1``), else ``"min"``.

    Each ``fit`` starts the count afresh (an instance passed to two fits forgets the first);
    a resumed fit takes it from the checkpoint.
    """

    patience: int = 3
    monitor: str = "val_loss"
    min_delta: float = 0.0
    restore_best: bool = True
    mode: str = "auto"
    _best: float = field(default=math.inf, init=False)
    _bad: int = field(default=0, init=False)
    _state: dict | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.reset()

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: :attr:`mode` with ``"auto"`` resolved from the monitor."""
        return monitor_mode(self.monitor, self.mode)

    def reset(self) -> None:
        """Forget the epochs seen (a new fit starts the count)."""
        self._best = -math.inf if self.direction == "max" else math.inf
        self._bad, self._state = 0, None

    def improved(self, value: float) -> bool:
        """Whether a value beats the best so far by more than ``min_delta``.

        Args:
            value: the monitored metric of an epoch.
        """
        if self.direction == "max":
            return value > self._best + self.min_delta
        return value < self._best - self.min_delta

    def step(self, record: dict, module: nn.Module) -> bool:
        """Record an epoch; True when training should stop.

        Args:
            record: the epoch's history record (must hold ``monitor``).
            module: what to snapshot when the epoch is the best so far (its ``state_dict``,
                with ``restore_best``).
        """
        if self.monitor not in record:
            raise FastFTValueError(
                f"early stopping monitors {self.monitor!r}, which this fit does not report "
                f"(it reports {', '.join(sorted(record))}); pass val= or monitor='loss'."
            )
        value = record[self.monitor]
        if self.improved(value):
            self._best, self._bad = value, 0
            if self.restore_best:
                self._state = copy.deepcopy(module.state_dict())
        else:
            self._bad += 1
        return self._bad >= self.patience

    @property
    def best(self) -> float:
        """The best value of the monitor so far (±inf before the first epoch)."""
        return self._best

    @property
    def best_state(self) -> dict | None:
        """The state dict of the best epoch so far (None before one, or without restore_best)."""
        return self._state

    def keep_missing(self, state: Mapping[str, Any]) -> None:
        """Add the entries of ``state`` the best state lacks: blocks frozen until now (a new
        stage unfreezes them) held at the best epoch what they hold now.

        Args:
            state: the trainable state now, under the model's names.
        """
        if self._state is not None:
            for name, t in state.items():
                self._state.setdefault(name, t)

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so that a resumed fit stops and restores as an uninterrupted
        one."""
        return {"best": self._best, "bad": self._bad, "state": self._state, "mode": self.direction}

    def load_state_dict(self, state: dict) -> None:
        """Take up the count of a checkpoint.

        Args:
            state: what :meth:`state_dict` returned.
        """
        # Checkpoints written before ``mode`` existed minimised every monitor: a best value
        # kept in the other direction means nothing here, so the count starts over.
        if state.get("mode", "min") != self.direction:
            self.reset()
            return
        self._best, self._bad, self._state = float(state["best"]), int(state["bad"]), state["state"]


def early_stopping_of(value: int | EarlyStopping | None, has_val: bool) -> EarlyStopping | None:
    """``fit(early_stopping=3)`` means patience 3 on val_loss (on loss without val data)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return EarlyStopping(patience=value, monitor="val_loss" if has_val else "loss")
    return value


@dataclass(frozen=True)
class Stage:
    """One stage of a fit: from ``first_epoch``, ``epochs`` epochs, after unfreezing ``blocks``
    (None: the cut stays as it is)."""

    first_epoch: int
    epochs: int
    blocks: int | None

    @property
    def end(self) -> int:
        return self.first_epoch + self.epochs

    def as_list(self) -> list:
        return [self.first_epoch, self.epochs, self.blocks]


def plan_stages(schedule: Sequence[tuple[int, int]] | None, epochs: int) -> list[Stage]:
    """The stages of a fit of ``epochs`` epochs with ``unfreeze=schedule``."""
    if not schedule:
        return [Stage(0, epochs, None)]
    try:
        steps = [(int(e), int(n)) for e, n in schedule]
    except (TypeError, ValueError):
        raise FastFTValueError(
            f"unfreeze= takes (epoch, blocks) pairs like [(5, 1), (8, 2)], got {schedule!r}."
        ) from None
    epochs_at = [e for e, _ in steps]
    if epochs_at != sorted(set(epochs_at)) or epochs_at[0] < 0 or epochs_at[-1] >= epochs:
        raise FastFTValueError(
            f"unfreeze= epochs must increase strictly and lie in 0..{epochs - 1} (the fit has "
            f"{epochs} epochs), got {epochs_at}."
        )
    stages = [] if epochs_at[0] == 0 else [Stage(0, epochs_at[0], None)]
    bounds = epochs_at + [epochs]
    stages += [Stage(e, bounds[i + 1] - e, n) for i, (e, n) in enumerate(steps)]
    return stages


def schedule_record(stages: Sequence[Stage]) -> list[list] | None:
    """How a checkpoint records the stages (None for a fit of one stage)."""
    return [st.as_list() for st in stages] if len(stages) > 1 else None


def training_batch_size(train: Any, batch_size: int | None) -> int:
    """fit's batch size: the one given, else a DataLoader's own, else 256; a DataLoader whose
    batch size differs from the one given is told that it only reads the samples."""
    loader = train.batch_size if isinstance(train, DataLoader) else None
    if batch_size is None:
        return loader or 256
    if loader is not None and loader != batch_size:
        warnings.warn(
            f"fit(batch_size={batch_size}) trains in batches of {batch_size}; the DataLoader's "
            f"batch_size={loader} only reads the samples for the one frozen pass. Leave fit's "
            "batch_size unset to train with the DataLoader's.",
            UserWarning,
            stacklevel=4,
        )
    return batch_size


def refuse_positional(call: str, names: Sequence[str], given: tuple) -> None:
    """CallFormError naming the keyword form when settings were passed by position (the form
    of fastft before they became keyword-only). ``call``: the leading arguments, as
    ``"fit(train, val"``."""
    if given:
        form = ", ".join(f"{n}=..." for n in names[: len(given)])
        raise CallFormError(
            f"{call.split('(')[0]}() takes its settings by keyword: write {call}, {form}) "
            f"instead of passing {len(given)} of them by position."
        )
