"""Seeded inputs for the test models (no downloads). Each ``*_batch`` is one input batch for the
matching model of :mod:`helpers.models`; each ``*_data`` is ``(inputs, labels)`` to train on.

- :func:`labelled` — ``n`` random rows of any shape and labels in ``range(classes)``.
- :func:`mlp_batch`, :func:`mlp_data` — ``[n, 12]`` rows (labels from the first two features).
- :func:`image_batch`, :func:`image_data` — ``[n, 3, 8, 8]`` images, 5 classes.
- :func:`token_batch`, :func:`token_data` — ``{'input_ids', 'attention_mask'}`` of padded
  sequences (vocabulary 50, at least 3 real tokens), 3 classes.
- :class:`Rows` — ``(X, y)`` as a map-style Dataset.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def labelled(n: int, shape: int | tuple[int, ...] = 6, *, classes: int = 3, seed: int = 1):
    """``n`` standard-normal inputs of ``shape`` and ``n`` labels in ``range(classes)``, drawn
    in that order from one generator seeded with ``seed``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------- rows for an MLP
def mlp_batch(n: int = 4, d_in: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def mlp_data(n: int = 80, seed: int = 1):
    """``[n, 12]`` rows; the label (0..2) counts how many of the first two features are large."""
    X = mlp_batch(n, 12, seed)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


# ---------------------------------------------------------------------------- images
def image_batch(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def image_data(n: int = 48, seed: int = 1):
    return labelled(n, (3, 8, 8), classes=5, seed=seed)


# ---------------------------------------------------------------------------- token sequences
def _tokens(n: int, length: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def token_batch(
    n: int = 4, length: int = 10, vocab: int = 50, seed: int = 1
) -> dict[str, torch.Tensor]:
    return _tokens(n, length, vocab, torch.Generator().manual_seed(seed))


def token_data(n: int = 48, length: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = _tokens(n, length, 50, g)
    return X, torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------------- a Dataset
class Rows(Dataset):
    """``(X, y)`` as a map-style Dataset of (input, label) items; X a tensor or a dict of them."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = {k: v[i] for k, v in self.X.items()} if isinstance(self.X, dict) else self.X[i]
        return x, self.y[i]
