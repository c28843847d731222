"""Factories named by the job configs of tests/test_jobs.py (``helpers.jobfactories:small_model``;
the job runs with ``tests/`` on PYTHONPATH)."""

import torch
from torch import nn


def small_model(width: int = 16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 10))


def splits(n: int = 64):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    return {"train": (X[: n - 16], y[: n - 16]), "test": (X[n - 16 :], y[n - 16 :])}


def deep_model(width: int = 16):
    """Two hidden Linear blocks under the head: something to unfreeze."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
