"""``fastft demo --task digits``: learn digits 0–4, then transfer to 5–9.

The seed's "cars → trucks" idea on real handwritten digits (scikit-learn's 8×8 digits,
1797 images, shipped with scikit-learn): a small CNN is pretrained on 0–4, its conv layers
are frozen, and a new head learns 5–9 — once with fastft (convs run once per image) and
once naively (convs run every epoch). Takes well under two minutes on a CPU.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fastft
from fastft.bench.demo.bbc_data import need
from fastft.train.metrics import classification_metrics


@dataclass
class DigitsSettings:
    epochs: int = 10
    pretrain_epochs: int = 15
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    verbose: bool = True


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    need("sklearn")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return X, torch.tensor(d.target)


def _split(X, y, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    cut = int(0.8 * len(y))
    return (X[perm[:cut]], y[perm[:cut]]), (X[perm[cut:]], y[perm[cut:]])


def train_plain(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
    *,
    lr: float = 2e-3,
    batch_size: int = 32,
) -> None:
    """Plain PyTorch training (AdamW, cross-entropy) of the parameters that require grad;
    each epoch's batch order is a randperm drawn from ``generator``. The demo, ``fastft
    bench`` and ``fastft probe`` pretrain the digits CNN on 0-4 with it."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            rows = perm[start : start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[rows]), y[rows]).backward()
            opt.step()


def _train(model: nn.Module, X, y, epochs: int, s: DigitsSettings) -> None:
    g = torch.Generator().manual_seed(s.seed)
    train_plain(model, X, y, epochs, g, lr=s.lr, batch_size=s.batch_size)


def _pretrain(X, y, s: DigitsSettings) -> DigitsCNN:
    torch.manual_seed(s.seed)
    model = DigitsCNN(5).train()
    _train(model, X, y, s.pretrain_epochs, s)
    return model.eval()


def _naive(model: nn.Module, train, test, s: DigitsSettings) -> tuple[float, float]:
    """Frozen convs in eval mode, run for every batch of every epoch; new head trained."""
    model.eval()  # the frozen convs (and their BatchNorm) in eval mode, as fastft runs them
    t0 = time.perf_counter()
    _train(model, *train, s.epochs, s)
    with torch.no_grad():
        acc = classification_metrics(model(test[0]), test[1])["accuracy"]
    return time.perf_counter() - t0, acc


def run(s: DigitsSettings) -> dict:
    X, y = load_digits()
    low, high = y < 5, y >= 5
    (Xa, ya), (Xa_test, ya_test) = _split(X[low], y[low], s.seed)
    (Xb, yb), (Xb_test, yb_test) = _split(X[high], y[high] - 5, s.seed)

    t0 = time.perf_counter()
    pretrained = _pretrain(Xa, ya, s)
    with torch.no_grad():
        source_acc = classification_metrics(pretrained(Xa_test), ya_test)["accuracy"]
    pretrain_seconds = time.perf_counter() - t0

    naive_model = copy.deepcopy(pretrained)
    ft = fastft.FineTuner(
        pretrained, num_classes=5, cache="host", cache_dtype="fp32", seed=s.seed, verbose=s.verbose
    )
    t0 = time.perf_counter()
    ft.build_cache((Xb, yb))
    # The naive loop starts from the very same new head.
    fastft.surgery.replace_head(naive_model, module=copy.deepcopy(ft.model.fc))
    fastft.surgery.freeze(naive_model, except_new=True)
    ft.fit((Xb, yb), epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
    fastft_acc = ft.evaluate((Xb_test, yb_test))["accuracy"]
    fastft_seconds = time.perf_counter() - t0

    naive_seconds, naive_acc = _naive(naive_model, (Xb, yb), (Xb_test, yb_test), s)
    return {
        "task": "digits 0-4 -> 5-9 (scikit-learn 8x8 digits), frozen convs + new head",
        "pretrain_accuracy_0_4": source_acc,
        "pretrain_seconds": pretrain_seconds,
        "epochs": s.epochs,
        "train_images": len(yb),
        "test_images": len(yb_test),
        "fastft": {
            "seconds": fastft_seconds,
            "test_accuracy": fastft_acc,
            "forward_passes": len(yb) + len(yb_test),
        },
        "naive": {
            "seconds": naive_seconds,
            "test_accuracy": naive_acc,
            "forward_passes": s.epochs * len(yb) + len(yb_test),
        },
        "speedup_vs_naive": naive_seconds / fastft_seconds,
    }


def table(report: dict) -> str:
    lines = [
        f"{report['task']}",
        f"pretrained on 0-4: {100 * report['pretrain_accuracy_0_4']:.1f}% test accuracy "
        f"({report['pretrain_seconds']:.1f} s)",
        f"{'method':<8} {'conv forward passes':>20} {'seconds':>8} {'test accuracy (5-9)':>20}",
    ]
    for name in ("naive", "fastft"):
        r = report[name]
        lines.append(
            f"{name:<8} {r['forward_passes']:>20,} {r['seconds']:>8.2f} "
            f"{100 * r['test_accuracy']:>19.1f}%"
        )
    lines.append(f"speed-up: {report['speedup_vs_naive']:.1f}x")
    return "\n".join(lines)


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "digits.json"
    path.write_text(json.dumps(report, indent=2))
    return {"json": path}
