"""What ``fit(checkpoint=..., resume=True)`` checks before it continues a fit.

A resumed fit must give the final weights of an uninterrupted one, so a checkpoint of a fit
with other settings, another schedule, another backbone or other data is refused with what
to change, never continued.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastft.cache.amp import resolve_amp
from fastft.errors import FastFTValueError
from fastft.model.status import warn_user
from fastft.train.checkpoint import TrainingState
from fastft.train.config import FitConfig, Stage, schedule_record
from fastft.train.tuned import TunedModel


def find_resumable(
    resume: bool, path: str | None, stages: Sequence[Stage], cfg: FitConfig, tuned: TunedModel
) -> TrainingState | None:
    """The checkpoint a ``fit(resume=True)`` goes on from (see :func:`read_resumable`), or
    None: without ``resume``, or, with a warning, when there is no checkpoint (the first run
    of a job that is run again after each preemption starts from scratch)."""
    if not resume:
        return None
    if path is None:
        warn_user(
            "fit(resume=True) without checkpoint=: there is nothing to resume from, so this "
            "fit starts from scratch. Pass checkpoint='run.ckpt' (written after every epoch) "
            "to make a fit resumable."
        )
        return None
    if not Path(path).is_file():
        where = Path(path).resolve().parent
        warn_user(
            f"fit(resume=True): no checkpoint found in {where} ({Path(path).name} does not "
            "exist yet); starting from scratch. Later runs of the same call resume from the "
            "checkpoint this fit writes."
        )
        return None
    return read_resumable(path, stages, cfg, tuned)


def read_resumable(
    path: str, stages: Sequence[Stage], cfg: FitConfig, tuned: TunedModel
) -> TrainingState:
    """The training checkpoint at ``path``, checked to come from a fit like this one (same
    settings, schedule, backbone; the data are checked by :func:`check_same_data`)."""
    saved = TrainingState.read(path)
    progress = saved.progress
    if progress is None:
        raise FastFTValueError(
            f"{path} is a saved model, not a training checkpoint; resume needs a checkpoint= file."
        )
    if progress.backbone is not None and progress.backbone != tuned.backbone_digest(saved.state):
        raise FastFTValueError(
            f"{path} was written by a fit of another backbone: the frozen weights of this model "
            "differ from those the checkpoint was trained on. Resume with the same pretrained "
            "model (a fresh copy of it), or start a new fit."
        )
    now = schedule_record(stages)
    if progress.schedule != now:
        raise FastFTValueError(
            f"{path} was written by a fit with stages "
            f"{progress.schedule or 'none (no unfreeze=)'} (first epoch, epochs, blocks), this "
            f"fit has {now or 'none (no unfreeze=)'}: resume with the same epochs= and "
            "unfreeze= as the interrupted fit."
        )
    # cuda_graph changes how steps run, not what they compute; epochs may grow (one stage)
    # unless a scheduler planned the learning rate over the epochs the fit was given.
    fit = saved.fit or {}
    if cfg.scheduler is not None and fit.get("epochs") not in (None, cfg.epochs):
        raise FastFTValueError(
            f"{path} was written by a fit of epochs={fit['epochs']} with "
            f"scheduler={cfg.scheduler!r}, whose learning rate is planned over those "
            f"{fit['epochs']} epochs: it cannot continue exactly for epochs={cfg.epochs}. "
            f"Resume with epochs={fit['epochs']}, or start a new fit."
        )
    differ = [
        k
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("epochs", "cuda_graph") and k in fit and fit[k] != v
    ]
    if differ:
        raise FastFTValueError(
            f"{path} was written by a fit with "
            f"{', '.join(f'{k}={fit[k]!r}' for k in differ)}; this fit has "
            f"{', '.join(f'{k}={getattr(cfg, k)!r}' for k in differ)}: "
            "resume with the same settings."
        )
    if saved.train_bn != tuned.train_bn:
        raise FastFTValueError(
            f"{path} was written with train_bn={saved.train_bn}: call "
            f"ft.unfreeze(..., train_bn={saved.train_bn}) before fit(..., resume=True), as "
            "before the interrupted fit."
        )
    return saved


def check_same_blocks(saved: TrainingState, path: str, tuned: TunedModel) -> None:
    """Resuming inside a stage needs the blocks unfrozen as they were."""
    if saved.unfrozen_blocks != tuned.unfrozen_blocks:
        raise FastFTValueError(
            f"{path} was written with {saved.unfrozen_blocks} unfrozen block(s) but this tuner has "
            f"{tuned.unfrozen_blocks}: call ft.unfreeze({saved.unfrozen_blocks}) before fit(..., "
            "resume=True), as before the interrupted fit."
        )


def check_same_data(saved: TrainingState, path: str, data_key: Callable[[], str]) -> None:
    """FastFTValueError when the checkpoint was written by a fit on other training data
    (``data_key()`` computes the key of the data given now: one more read of a Dataset, paid
    only by a resume)."""
    if saved.progress.data_key is not None and saved.progress.data_key != data_key():
        raise FastFTValueError(
            f"{path} was written by a fit on other training data than the data given now: "
            "resuming would continue that fit on these data. Resume with the same data (and "
            "dataset_id=), or start a new fit (another checkpoint= path, or resume=False)."
        )


def pass_precision(extract_amp: str | None, device: torch.device) -> str:
    """ "bf16" or "fp32": the precision a frozen pass with ``extract_amp`` runs in on
    ``device`` (``"auto"`` resolved as the cache build resolves it)."""
    return resolve_amp(extract_amp, device, "extract_amp") or "fp32"


def check_same_pass(saved: TrainingState, path: str, now: str) -> None:
    """FastFTValueError when the checkpoint's head was trained on features of a frozen pass in
    another precision than this fit's (``now``): an ``extract_amp`` changed, or ``"auto"``
    resolving otherwise on this machine."""
    before = saved.progress.extract
    if before is not None and before != now:
        raise FastFTValueError(
            f"{path} was written by a fit on features of a {before} frozen pass, this fit's "
            f"pass runs in {now} (extract_amp='auto' is bf16 only where the device computes "
            "it natively): resuming would continue on differently rounded features. Resume "
            f"with extract_amp={before!r} (None for fp32), or start a new fit."
        )


def rng_state(device: torch.device) -> dict:
    """torch's global random state (CPU, and the device's on CUDA): dropout draws from it."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # pragma: cuda
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)  # pragma: cuda
