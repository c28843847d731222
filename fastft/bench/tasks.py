"""What the benchmarks and the demo train: the settings, the tasks, and the shared measures."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fastft


@dataclass
class BenchSettings:
    tasks: tuple[str, ...] = ("bbc", "cnn")
    epochs: tuple[int, ...] = (1, 3, 10)
    dtypes: tuple[str, ...] = ("fp32", "fp16", "int8")
    tiers: tuple[str, ...] = ("host", "disk")
    # fastft's frozen pass: each mode is a run (fp32; auto = bf16 where native, else fp32).
    extract_amps: tuple[str, ...] = ("auto",)
    quick: bool = False
    max_seq_length: int | None = None  # default 128, or 64 with quick
    per_class_limit: int | None = None  # default all articles, or 50 per class with quick
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    verbose: bool = True

    def __post_init__(self):
        quick_defaults(self)
        self.epochs = tuple(sorted(set(int(e) for e in self.epochs)))
        if not self.epochs or self.epochs[0] < 1:
            raise fastft.FastFTValueError(f"epochs must be positive integers, got {self.epochs}.")


def quick_defaults(settings) -> None:
    """MiniLM/BBC sizes left at None: 128 tokens and every article, or 64 and 50 per class
    with ``quick``."""
    if settings.max_seq_length is None:
        settings.max_seq_length = 64 if settings.quick else 128
    if settings.per_class_limit is None and settings.quick:
        settings.per_class_limit = 50


@dataclass
class Task:
    """A frozen part, a seeded new head, and the data: what both methods train."""

    name: str
    title: str
    model: nn.Module  # the pretrained model FineTuner edits (a deep copy per run)
    frozen: Callable[[Any], torch.Tensor]  # the naive loop's frozen part: inputs -> features
    head: nn.Module  # the initial new layers (deep-copied for each run)
    train: tuple[Any, torch.Tensor]
    test: tuple[Any, torch.Tensor]
    notes: dict = field(default_factory=dict)


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def bbc_task(s: BenchSettings) -> Task:
    """all-MiniLM-L6-v2 (frozen transformer + pooling + normalize) + a new 384-256-5 head."""
    from fastft.bench.demo.bbc_data import load_bbc, load_minilm, stratified_split, tokenize

    model = load_minilm(s.max_seq_length).eval()
    texts, labels, classes = load_bbc(s.per_class_limit)
    train_idx, test_idx = stratified_split(labels, 0.2, s.seed)
    tokens = tokenize(model, texts, s.max_seq_length)
    pick = lambda idx: {k: v[idx] for k, v in tokens.items()}  # noqa: E731
    dim = model.get_sentence_embedding_dimension()
    head = seeded(
        lambda: nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, len(classes))), s.seed
    )
    return Task(
        "bbc",
        "all-MiniLM-L6-v2 on BBC News",
        model,
        lambda x: model(x)["sentence_embedding"],
        head,
        (pick(train_idx), labels[train_idx]),
        (pick(test_idx), labels[test_idx]),
        {"max_seq_length": s.max_seq_length, "per_class_limit": s.per_class_limit},
    )


def cnn_task(s: BenchSettings) -> Task:
    """The digits demo's CNN pretrained on 0–4; frozen convs, a new Linear head for 5–9."""
    from fastft.bench.demo.digits import DigitsCNN, load_digits, train_plain

    X, y = load_digits()
    low, high = y < 5, y >= 5
    (Xa, ya), _ = split_80_20(X[low], y[low], s.seed)
    train, test = split_80_20(X[high], y[high] - 5, s.seed)
    torch.manual_seed(s.seed)
    model = DigitsCNN(5).train()
    # Pretraining on 0-4: not part of what is measured.
    train_plain(model, Xa, ya, 15, torch.Generator().manual_seed(s.seed))
    model.eval()
    head = seeded(lambda: nn.Linear(model.fc.in_features, 5), s.seed)
    return Task("cnn", "digits CNN, 0-4 -> 5-9", model, model.features, head, train, test)


def split_80_20(X, y, seed):
    """80/20 split after a seeded shuffle."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (X[perm[:cut]], y[perm[:cut]]), (X[perm[cut:]], y[perm[cut:]])


TASKS = {"bbc": bbc_task, "cnn": cnn_task}


def index_rows(x, rows):
    """Rows of a tensor or of every tensor of a dict."""
    return {k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]


def accuracy(frozen, head: nn.Module, data, batch_size: int = 256) -> float:
    """Test accuracy of ``head(frozen(x))`` on ``data = (X, y)``."""
    X, y = data
    head.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(y)))
            correct += int((head(frozen(index_rows(X, rows))).argmax(-1) == y[rows]).sum())
    return correct / len(y)


def machine() -> str:
    """The machine a run measured: CPU, threads, torch, CUDA device, native kernels."""
    import platform

    return (
        f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"CUDA {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
        f"native kernels {'on' if fastft.has_native() else 'off'}"
    )
