"""Losses of the trainer and the label checks that go with them."""

from __future__ import annotations

import torch
from torch import nn

from fastft.errors import DataError, FastFTValueError

LOSSES = ("ce", "bce", "mse")


def check_labels(labels: torch.Tensor, loss: str, num_outputs: int, what: str = "training") -> None:
    """Reject labels that do not fit the loss (before any training), saying what was expected.
    ``what`` names the data in the message (``"training"``, ``"val"``)."""
    where = f"the {what} labels"
    if loss == "ce":
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
            raise DataError(
                f"loss='ce' needs integer class labels of shape [N]; {where} are {labels.dtype} "
                f"of shape {tuple(labels.shape)}. Convert with labels.long(), or use loss='bce' "
                "for multi-label 0/1 targets or loss='mse' for regression."
            )
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_outputs:
                bad = int(((labels < 0) | (labels >= num_outputs)).nonzero()[0, 0])
                raise DataError(
                    f"label {int(labels[bad])} of sample {bad} of {where} is outside "
                    f"[0, {num_outputs}); the model has num_classes={num_outputs}. Remap labels "
                    f"to 0..{num_outputs - 1} or pass the right num_classes."
                )
        return
    if loss == "bce":
        if labels.dim() != 2 or labels.shape[1] != num_outputs:
            raise DataError(
                f"loss='bce' needs 0/1 targets of shape [N, {num_outputs}]; {where} have shape "
                f"{tuple(labels.shape)}."
            )
        _check_finite(labels, where, loss)
        values = labels.float()
        if labels.numel() and (bool((values < 0).any()) or bool((values > 1).any())):
            bad = int(((values < 0) | (values > 1)).any(dim=1).nonzero()[0, 0])
            raise DataError(
                f"loss='bce' needs targets in [0, 1]; sample {bad} of {where} has "
                f"{labels[bad].tolist()[:8]}. Scale the targets to [0, 1] "
                "(probabilities or 0/1 labels)."
            )
    elif loss == "mse":
        if not labels.is_floating_point():
            raise DataError(
                f"loss='mse' needs float targets; {where} are {labels.dtype}. Convert with "
                "labels.float()."
            )
        _check_finite(labels, where, loss)


def _check_finite(labels: torch.Tensor, where: str, loss: str) -> None:
    if labels.is_floating_point() and labels.numel() and not bool(torch.isfinite(labels).all()):
        flat = labels.reshape(labels.shape[0], -1) if labels.dim() else labels.reshape(1, 1)
        bad = int((~torch.isfinite(flat)).any(dim=1).nonzero()[0, 0])
        raise DataError(
            f"loss={loss!r}: sample {bad} of {where} is NaN or Inf; training on it would make "
            "every weight NaN. Drop or fix that sample."
        )


def make_loss(loss: str, *, label_smoothing: float = 0.0, class_weights=None) -> nn.Module:
    """The loss module for ``loss`` in ``ce | bce | mse`` (mean reduction)."""
    if loss == "ce":
        weight = (
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        )
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if label_smoothing:
        raise FastFTValueError("label_smoothing applies to loss='ce' only.")
    if loss == "bce":
        weight = (
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        )
        return nn.BCEWithLogitsLoss(pos_weight=weight)
    if loss == "mse":
        return nn.MSELoss()
    raise FastFTValueError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}.")


def prepare_targets(labels: torch.Tensor, loss: str, out: torch.Tensor) -> torch.Tensor:
    """Targets in the dtype and shape the loss expects for model output ``out``."""
    if loss == "ce":
        return labels.long()
    targets = labels.to(out.dtype)
    if loss == "mse" and targets.dim() == 1 and out.dim() == 2 and out.shape[1] == 1:
        targets = targets.unsqueeze(1)
    return targets
