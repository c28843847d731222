"""The evaluation protocol: which training rows fit the heads, which choose their settings.

- A **validation split** is carved from the training set, stratified by class and seeded:
  hyper-parameters (learning rate, weight decay, C, k) are chosen on it, never on the test
  set. The test set is scored once per chosen configuration.
- **Few-shot** (``shots=k``): k training rows per class are sampled, seeded, from what is
  left of the training set after the validation rows were taken out, so validation rows
  are never training rows (the leak CLIP_benchmark's users reported).

Indices here are rows of the user's training set; the test set is a separate dataset and
never enters a split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fastft.errors import FastFTValueError

__all__ = ["Split", "make_split", "stratified_split", "few_shot"]


@dataclass
class Split:
    """Rows of the training set used to fit the heads (``fit``) and to choose their
    hyper-parameters (``val``); what made them (``seed``, ``val_fraction``, ``shots``)."""

    fit: torch.Tensor
    val: torch.Tensor
    seed: int
    val_fraction: float
    shots: int | None = None
    classes: list[int] = field(default_factory=list)

    def describe(self) -> dict:
        """The split as the report records it (the rows too: a few-shot sample is reproducible
        from the seed, and checkable from the rows)."""
        d = asdict(self)
        d["fit"] = self.fit.tolist()
        d["val"] = self.val.tolist()
        d["n_fit"], d["n_val"] = len(self.fit), len(self.val)
        return d


def _by_class(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    labels = torch.as_tensor(labels).reshape(-1)
    return {int(c): (labels == c).nonzero().reshape(-1) for c in torch.unique(labels)}


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, held_out)`` row indices (sorted): ``round(fraction * n_c)`` rows of every class
    ``c`` held out (at least one when the class has two or more rows), chosen by a seeded
    permutation per class."""
    if not 0.0 < fraction < 1.0:
        raise FastFTValueError(f"val_fraction must be between 0 and 1 (exclusive); got {fraction}.")
    g = torch.Generator().manual_seed(int(seed))
    rest, held = [], []
    for _, rows in sorted(_by_class(labels).items()):
        perm = rows[torch.randperm(len(rows), generator=g)]
        k = int(round(fraction * len(rows)))
        k = min(max(k, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        held.append(perm[:k])
        rest.append(perm[k:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values


def few_shot(labels: torch.Tensor, rows: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """``shots`` rows per class drawn (seeded) from ``rows`` of the training set, sorted."""
    if shots < 1:
        raise FastFTValueError(f"shots must be a positive number of rows per class; got {shots}.")
    labels = torch.as_tensor(labels).reshape(-1)
    g = torch.Generator().manual_seed(int(seed) + 1)  # not the stream the validation rows used
    picked = []
    for c, local in sorted(_by_class(labels[rows]).items()):
        if len(local) < shots:
            raise FastFTValueError(
                f"class {c} has {len(local)} training rows left after the validation split, fewer "
                f"than shots={shots}; lower shots or val_fraction."
            )
        picked.append(rows[local[torch.randperm(len(local), generator=g)[:shots]]])
    return torch.cat(picked).sort().values


def make_split(
    labels: torch.Tensor, *, val_fraction: float, seed: int, shots: int | None = None
) -> Split:
    """The protocol's split of a training set with these ``labels`` (see the module docstring)."""
    labels = torch.as_tensor(labels).reshape(-1)
    rest, val = stratified_split(labels, val_fraction, seed)
    if len(val) == 0:
        raise FastFTValueError(
            f"no validation rows: no class of the {len(labels)} training rows has two rows, so "
            "none can be held out to choose the heads' settings; give more training rows."
        )
    fit = few_shot(labels, rest, shots, seed) if shots is not None else rest
    classes = sorted(int(c) for c in torch.unique(labels))
    return Split(fit, val, int(seed), float(val_fraction), shots, classes)
