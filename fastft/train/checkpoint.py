"""Saved tuners and training checkpoints: one record, written atomically, read weights-only.

:class:`TrainingState` is what ``FineTuner.save`` writes (the configuration, the new head's
placement, the trained weights, the history, the fit's settings, the unfrozen blocks) and
what every checkpoint starts with; a checkpoint adds the fit's :class:`Progress`.

A file is a dict of plain containers and tensors written with ``torch.save`` to a
temporary file in the same folder, fsynced, then renamed over the target: a crash at any
point leaves either the old or the new checkpoint, never a torn one. Loading uses
``torch.load(weights_only=True)``, so no code is ever unpickled from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastft.errors import FastFTError

FORMAT = "fastft-finetuner"
VERSION = 1


class CheckpointError(FastFTError, ValueError):
    """A checkpoint file is missing, unreadable or not a fastft checkpoint of this version."""


@dataclass
class Progress:
    """Where an interrupted fit stood, so that ``fit(resume=True)`` goes on exactly."""

    epochs_done: int  # of the stage the fit was in
    global_epochs_done: int  # of the whole fit
    engine: dict  # optimizer, schedule and batch-order state
    rng: dict | None  # torch's global random state: dropout in the trained layers draws from it
    data_key: str | None  # the training data's key: a resume on other data is refused
    backbone: str | None  # digest of the frozen weights: a resume on another backbone is refused
    schedule: list | None = None  # the stages of an unfreeze schedule
    early_stopping: dict | None = None
    early_stopped: bool = False
    # The frozen pass's precision ("bf16" or "fp32"): a resume on features of another
    # precision is refused (None in checkpoints written before it was recorded).
    extract: str | None = None


@dataclass
class TrainingState:
    """A tuner as ``save`` writes it; with ``progress``, a training checkpoint."""

    config: dict[str, Any]
    head: dict | None
    state: dict[str, torch.Tensor]
    history: list[dict]
    fit: dict | None
    unfreeze: tuple[int, bool] | None
    progress: Progress | None = None

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (the old file stays whole until the new one is)."""
        record = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"
        }
        if self.progress is not None:
            record.update(dataclasses.asdict(self.progress))
        return save_atomic(record, path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> TrainingState:
        """Read a file :meth:`write` wrote; CheckpointError when it is not one."""
        obj = load_checked(path)
        missing = [k for k in ("config", "state") if k not in obj]
        if missing:
            raise CheckpointError(
                f"{path} lacks {', '.join(missing)}: it is not a whole fastft checkpoint."
            )
        progress = None
        if "engine" in obj:
            obj.setdefault("global_epochs_done", obj["epochs_done"])  # written before schedules
            progress = Progress(
                **{
                    f.name: obj.get(f.name)
                    for f in dataclasses.fields(Progress)
                    if f.name in obj or f.default is dataclasses.MISSING
                }
            )
        unfreeze = obj.get("unfreeze")
        return cls(
            config=obj["config"],
            head=obj.get("head"),
            state=obj["state"],
            history=list(obj.get("history") or []),
            fit=obj.get("fit"),
            unfreeze=None if unfreeze is None else (int(unfreeze[0]), bool(unfreeze[1])),
            progress=progress,
        )

    @property
    def unfrozen_blocks(self) -> int:
        return self.unfreeze[0] if self.unfreeze else 0

    @property
    def train_bn(self) -> bool:
        return bool(self.unfreeze[1]) if self.unfreeze else False


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checked(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle with code, ...
        raise CheckpointError(
            f"{path} is not a readable fastft checkpoint ({type(exc).__name__}: {exc}). "
            "Checkpoints are loaded weights-only; re-save it with FineTuner.save()."
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastft FineTuner checkpoint.")
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {obj.get('version')}; this fastft reads version "
            f"{VERSION}."
        )
    return obj


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
