"""One call of ``FineTuner.fit``: its stages, caches, epochs, checkpoints and resume.

A fit is a list of stages (one without ``unfreeze=``). Each stage trains like a ``fit`` of
its own epochs (a fresh optimizer and schedule, the batch order drawn from the seed again)
on the cache at its cut. With an unfreeze schedule the caches of the deepest cut are built
first; when that cut is a replay split, the higher cuts' caches are computed from them
(:mod:`fastft.cache.derive`) instead of by frozen passes over the data.

A checkpoint says how many epochs of the whole fit were done: on resume the stages finished
before the interruption are skipped and the one it hit goes on from there, with the weights,
optimizer, history, early-stopping state and random state of the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from fastft.cache import FeatureCache
from fastft.cache.derive import can_derive
from fastft.train.caches import example_of
from fastft.train.checkpoint import Progress, TrainingState
from fastft.train.config import (
    EarlyStopping,
    FitConfig,
    History,
    Stage,
    epochs_before,
    schedule_record,
)
from fastft.train.engine import Engine
from fastft.train.evaluation import cache_metrics, num_outputs
from fastft.train.objectives import check_labels
from fastft.train.progress import EpochProgress
from fastft.train.resume import (
    check_same_blocks,
    check_same_data,
    check_same_pass,
    find_resumable,
    pass_precision,
    rng_state,
    set_rng_state,
)

if TYPE_CHECKING:
    from fastft.train.finetuner import FineTuner

Callback = Callable[["FineTuner", dict], Any]


@dataclass
class LowCut:
    """The deepest cut of an unfreeze schedule: blocks unfrozen there, its tail and caches."""

    blocks: int
    tail: nn.Module
    cache: FeatureCache
    val_cache: FeatureCache | None = None


class TrainableState:
    """What early stopping keeps of an epoch: the trainable state under the model's names, so
    that it restores into the model whichever stage (and tail) it was taken in."""

    def __init__(self, ft: FineTuner):
        self.ft = ft

    def state_dict(self) -> dict:
        return self.ft.tuned.trainable_state()


class StagedFit:
    """Runs a fit of ``cfg`` in ``stages`` on ``ft`` (see the module docstring)."""

    def __init__(
        self,
        ft: FineTuner,
        cfg: FitConfig,
        stages: Sequence[Stage],
        *,
        train: Any,
        val: Any,
        early_stopping: EarlyStopping | None,
        callbacks: Iterable[Callback],
        checkpoint: str | None,
        dataset_id: str | None,
    ):
        self.ft, self.cfg, self.stages = ft, cfg, list(stages)
        self.train, self.val, self.dataset_id = train, val, dataset_id
        self.early_stopping, self.callbacks, self.checkpoint = (
            early_stopping,
            list(callbacks),
            checkpoint,
        )
        self.data_key: str | None = None  # the training data's key, recorded in checkpoints

    def run(self, *, resume: bool) -> History:
        """Train; returns this call's epochs (``ft.history`` holds every fit's)."""
        ft, cfg, es = self.ft, self.cfg, self.early_stopping
        if es is not None:
            es.reset()  # each fit counts afresh (a resumed one takes the checkpoint's count)
        saved = find_resumable(resume, self.checkpoint, self.stages, cfg, ft.tuned)
        # A fit goes on from the current weights and numbers its epochs after the last fit's;
        # a resumed one after the epochs its checkpoint's history holds before it.
        self.first_record = len(ft.history)
        if saved is not None:
            self.first_record = len(saved.history) - saved.progress.global_epochs_done
        self.base = epochs_before(ft.history if saved is None else saved.history, self.first_record)
        low = self._lowest_cut() if len(self.stages) > 1 else None
        for stage in self.stages:
            stage_resume = None  # the checkpoint, when this stage goes on from inside
            if stage.blocks is not None:
                ft.unfreeze(stage.blocks, train_bn=ft.tuned.train_bn)
            if saved is not None:
                done = saved.progress.global_epochs_done
                # Ended: stopped early, or every epoch done (then the tuner is at the last cut).
                ended = saved.progress.early_stopped or (
                    stage.end >= cfg.epochs and done >= cfg.epochs
                )
                if done >= stage.end and not ended:
                    continue  # trained before the interruption
                # The data first (nothing of the checkpoint is taken on other data), then the
                # weights before this stage's cache is built: its frozen part may hold blocks
                # an earlier stage trained.
                check_same_data(
                    saved, self.checkpoint, lambda: ft.caches.data_key(self.train, self.dataset_id)
                )
                check_same_pass(saved, self.checkpoint, pass_precision(ft.extract_amp, ft.device))
                ft.prepare(example_of(self.train))
                self._restore_progress(saved)
                if es is not None and saved.progress.early_stopping:
                    es.load_state_dict(saved.progress.early_stopping)
                if ended:
                    break
                if done > stage.first_epoch:  # inside this stage: its optimizer state too
                    stage_resume = saved
                saved = None
            if stage.blocks is not None and es is not None and es.best_state is not None:
                es.keep_missing(ft.tuned.trainable_state())
            if self._run_stage(stage, stage_resume, low):
                break
        if es is not None and es.restore_best and es.best_state:
            ft.model.load_state_dict(es.best_state, strict=False)
        ft.tail.eval()
        return History(ft.history[self.first_record :])

    # ------------------------------------------------------------------ caches
    def _build_train_cache(self) -> None:
        self.ft.build_cache(self.train, dataset_id=self.dataset_id)
        self.data_key = self.ft.cache.parts["dataset"]

    def _eval_cache(self, data: Any) -> FeatureCache:
        ft = self.ft
        pool = ft.tuned.cache_pool(ft.pool)
        return ft.caches.build(ft.prefix, data, pool=pool, train=False, label="val cache")

    def _lowest_cut(self) -> LowCut | None:
        """Build the caches (train, and val when given) at the deepest cut of the schedule;
        kept when the higher cuts' caches can be derived from them."""
        ft = self.ft
        first, train_bn = ft.tuned.unfrozen_blocks, ft.tuned.train_bn
        deepest = max((st.blocks for st in self.stages if st.blocks is not None), default=0)
        if deepest <= first or ft.views > 1:
            return None
        ft.unfreeze(deepest, train_bn=train_bn)
        try:
            self._build_train_cache()
            val_cache = None if self.val is None else self._eval_cache(self.val)
            low = LowCut(deepest, ft.tail, ft.cache, val_cache)
        finally:  # also when the deep cache cannot be built: the tuner is left as it was
            ft.unfreeze(first, train_bn=train_bn)
        return low if can_derive(low.tail, low.cache) else None

    def _stage_caches(self, low: LowCut | None) -> FeatureCache | None:
        """``ft.cache`` for the current cut, and the val cache (returned): derived from
        ``low`` when the cut is above it, else built (or reused) from the data."""
        ft = self.ft
        ft.prepare(example_of(self.train))
        if low is not None and ft.tuned.unfrozen_blocks < low.blocks:
            pool = ft.tuned.cache_pool(ft.pool)
            ft.cache = ft.caches.derived(ft.prefix, low.tail, low.cache, pool=pool)
            if low.val_cache is not None:
                return ft.caches.derived(ft.prefix, low.tail, low.val_cache, pool=pool)
        else:
            self._build_train_cache()
        return self._eval_cache(self.val) if self.val is not None else None

    # ------------------------------------------------------------------ one stage
    def _run_stage(
        self, stage: Stage, resume_from: TrainingState | None, low: LowCut | None
    ) -> bool:
        """Train the stage's epochs at the current cut (from inside them when ``resume_from``
        is a checkpoint of this stage); True when training should stop."""
        ft, cfg = self.ft, self.cfg.with_epochs(stage.epochs)
        val_cache = self._stage_caches(low)
        labels = ft.cache.labels.to(ft.device)
        n_out = (
            ft.num_classes
            if ft.num_classes is not None
            else num_outputs(ft.tail, ft.cache, device=ft.device)
        )
        check_labels(labels, cfg.loss, n_out)
        if val_cache is not None:  # before the first epoch, not after it
            check_labels(val_cache.labels, cfg.loss, n_out, what="val")

        engine = Engine(cfg, [ft.tail], device=ft.device, seed=ft.seed, n_rows=ft.cache.num_rows)
        start_epoch = 0
        if resume_from is not None:
            check_same_blocks(resume_from, self.checkpoint, ft.tuned)
            self._restore_progress(resume_from)
            engine.load_state_dict(resume_from.progress.engine)
            start_epoch = int(resume_from.progress.epochs_done)
        progress = EpochProgress(
            epochs=cfg.epochs,
            done=start_epoch,
            fit_epochs=self.base + self.cfg.epochs,
            enabled=ft.verbose,
            unfrozen_blocks=ft.tuned.unfrozen_blocks,
        )
        try:
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                losses = engine.run_epoch(ft.cache, labels)
                record = {
                    "epoch": self.base + stage.first_epoch + epoch + 1,
                    "loss": losses[0],
                    "lr": engine.current_lrs()[0],
                }
                if ft.tuned.unfrozen_blocks:
                    record["unfrozen_blocks"] = ft.tuned.unfrozen_blocks
                if val_cache is not None:
                    metrics = cache_metrics(ft.tail, val_cache, cfg, device=ft.device)
                    record.update({f"val_{k}": v for k, v in metrics.items()})
                record["seconds"] = time.perf_counter() - t0
                ft.history.append(record)
                ft.fitted = True
                progress.epoch_done(record)
                stop = any(cb(ft, record) is False for cb in self.callbacks)
                early_stopped = self.early_stopping is not None and self.early_stopping.step(
                    record, TrainableState(ft)
                )
                # After the callbacks: what they draw is in the checkpoint's random state.
                if self.checkpoint is not None:
                    self._write_checkpoint(engine, epoch + 1, stage, early_stopped)
                if stop or early_stopped:
                    return True
            return False
        finally:
            progress.close()
            engine.release_graph()

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(
        self, engine: Engine, epochs_done: int, stage: Stage, early_stopped: bool
    ) -> None:
        ft = self.ft
        record = ft.training_state()
        record.progress = Progress(
            epochs_done=epochs_done,
            global_epochs_done=stage.first_epoch + epochs_done,
            engine=engine.state_dict(),
            rng=rng_state(ft.device),
            data_key=self.data_key,
            backbone=ft.tuned.backbone_digest(record.state),
            extract=pass_precision(ft.extract_amp, ft.device),
            schedule=schedule_record(self.stages),
            early_stopping=None
            if self.early_stopping is None
            else self.early_stopping.state_dict(),
            early_stopped=bool(early_stopped),
        )
        record.write(self.checkpoint)

    def _restore_progress(self, saved: TrainingState) -> None:
        """The trained weights, history and random state of a checkpoint (not its optimizer)."""
        ft = self.ft
        ft.tuned.load_state(saved.state, self.checkpoint)
        if saved.progress.rng is not None:
            set_rng_state(saved.progress.rng, ft.device)
        ft.history = History(saved.history)
        ft.fitted = True
