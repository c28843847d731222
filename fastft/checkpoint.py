"""Atomic, weights-only checkpoints.

A checkpoint is a dict of plain containers and tensors written with ``torch.save`` to a
temporary file in the same folder, fsynced, then renamed over the target: a crash at any
point leaves either the old or the new checkpoint, never a torn one. Loading uses
``torch.load(weights_only=True)``, so no code is ever unpickled from a checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastft.errors import FastFTError

FORMAT = "fastft-finetuner"
VERSION = 1


class CheckpointError(FastFTError, ValueError):
    """A checkpoint file is missing, unreadable or not a fastft checkpoint of this version."""


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
            f"{path} has checkpoint version {obj.get('version')}; this fastft reads version {VERSION}."
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
