"""Classification and regression metrics computed from logits, with no extra dependency."""

from __future__ import annotations

import torch

from fastft.train.objectives import make_loss, prepare_targets


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, top-5 accuracy (when there are more than 5 classes) and macro-F1.

    ``logits`` is ``[N, C]``, ``labels`` integer ``[N]``. Classes absent from both the
    labels and the predictions do not count towards the macro average (as scikit-learn's
    ``f1_score(average="macro")`` with ``labels`` = the classes present).
    """
    preds = logits.argmax(dim=1)
    num_classes = logits.shape[1]
    out = {"accuracy": (preds == labels).double().mean().item()}
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices
        out["top5"] = (top5 == labels.unsqueeze(1)).any(dim=1).double().mean().item()
    out["macro_f1"] = macro_f1(preds, labels, num_classes)
    return out


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over classes that occur in labels or predictions."""
    idx = labels * num_classes + preds
    confusion = torch.bincount(idx, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )
    tp = confusion.diag().double()
    predicted = confusion.sum(dim=0).double()
    actual = confusion.sum(dim=1).double()
    present = (predicted + actual) > 0
    denom = predicted + actual
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return f1[present].mean().item() if bool(present.any()) else 0.0


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per-label accuracy of ``logits > 0`` against 0/1 ``targets`` and subset accuracy."""
    hits = (logits > 0) == (targets > 0.5)
    return {
        "label_accuracy": hits.double().mean().item(),
        "subset_accuracy": hits.all(dim=1).double().mean().item(),
    }


def fit_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str,
    label_smoothing: float = 0.0,
    class_weights: list[float] | None = None,
) -> dict[str, float]:
    """The loss of a fit's objective on ``logits`` and the metrics that go with it: accuracy
    and macro-F1 for ``'ce'``, label and subset accuracy for ``'bce'``."""
    loss_fn = make_loss(loss, label_smoothing=label_smoothing, class_weights=class_weights)
    value = loss_fn.to(logits.device)(logits, prepare_targets(labels, loss, logits)).item()
    if loss == "ce":
        return {"loss": value, **classification_metrics(logits, labels.long())}
    if loss == "bce":
        return {"loss": value, **multilabel_metrics(logits, labels)}
    return {"loss": value}
