"""``fastft probe``: every layer × head of the demo's backbones, one frozen pass each.

- ``--task bbc`` (default): all-MiniLM-L6-v2 over BBC News (offline: the demo extra), the
  embedding output and all 6 transformer layers, masked-mean pooled;
- ``--task digits``: the digits demo's CNN, pretrained on digits 0-4, probed on 5-9 at three
  depths (spatial mean) and at its 0-4 logits (``fc``).

The grids default to 16 linear configurations (4 learning rates × 4 weight decays), 4 MLP
heads, 8 values of C and 4 values of k. The report goes to ``--out`` (JSON, CSV, Markdown,
heatmap PNG) and the table to stdout.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from fastft.probing.api import DEFAULT_CS, DEFAULT_KS, DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, HEADS
from fastft.probing.heads import small_ops

__all__ = ["add_probe_parser", "bbc_probe_task", "digits_probe_task"]

#: Three depths (spatial mean) and the logits of the 0-4 pretraining task; not ``features.11``
#: (the pooled output): it equals ``features.9``'s spatial mean, a duplicate row.
DIGITS_TAPS = ["features.2", "features.5", "features.9", "fc"]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a comma-separated list of numbers"
        ) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a comma-separated list of integers"
        ) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive integer")
    return value


def _heads(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in HEADS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {HEADS}")
    return names


def bbc_probe_task(limit: int | None, max_seq_length: int, seed: int) -> dict[str, Any]:
    """MiniLM and BBC News as the demo loads them (offline), tokenized once, split 80/20."""
    from fastft.bench.demo.bbc_data import load_bbc, load_minilm, stratified_split, tokenize

    model = load_minilm(max_seq_length).eval()
    texts, labels, _ = load_bbc(limit)
    train_idx, test_idx = stratified_split(labels, 0.2, seed)
    tokens = tokenize(model, texts, max_seq_length)
    pick = lambda idx: ({k: v[idx] for k, v in tokens.items()}, labels[idx])  # noqa: E731
    return {
        "backbones": {"all-MiniLM-L6-v2": model},
        "train": pick(train_idx),
        "test": pick(test_idx),
        "taps": "blocks",
        "pooling": "masked_mean",
    }


def digits_probe_task(limit: int | None, pretrain_epochs: int, seed: int) -> dict[str, Any]:
    """The digits demo's CNN pretrained on 0-4 (seeded), and digits 5-9 split 80/20."""
    from fastft.bench.demo.digits import DigitsCNN, load_digits, train_plain

    X, y = load_digits()
    g = torch.Generator().manual_seed(seed)
    low = (y < 5).nonzero().reshape(-1)
    torch.manual_seed(seed)
    model = DigitsCNN(5).train()
    with small_ops(X):  # tiny convolutions: a thread pool would slow them down
        train_plain(model, X[low], y[low], pretrain_epochs, g)  # on 0-4: not what is measured
    model.eval()
    high = []
    for c in range(5, 10):
        rows = (y == c).nonzero().reshape(-1)
        high.append(rows[torch.randperm(len(rows), generator=g)][:limit])
    rows = torch.cat(high)[torch.randperm(sum(len(h) for h in high), generator=g)]
    cut = int(0.8 * len(rows))
    part = lambda r: (X[r], y[r] - 5)  # noqa: E731
    return {
        "backbones": {"digits-cnn": model},
        "train": part(rows[:cut]),
        "test": part(rows[cut:]),
        "taps": DIGITS_TAPS,
        "pooling": "mean",
    }


def _cmd_probe(args: argparse.Namespace) -> int:
    from fastft.probing.api import probe

    if args.task == "digits":
        task = digits_probe_task(args.limit, args.pretrain_epochs, args.seed)
    else:
        task = bbc_probe_task(args.limit, args.max_seq_length, args.seed)
    report = probe(
        task["backbones"],
        task["train"],
        task["test"],
        taps=task["taps"],
        pooling=task["pooling"],
        concat_last=args.concat_last,
        heads=args.heads,
        lrs=args.lrs,
        weight_decays=args.weight_decays,
        epochs=args.epochs,
        Cs=args.Cs,
        ks=args.ks,
        val_fraction=args.val_fraction,
        shots=args.shots,
        seed=args.seed,
        cache=args.cache,
        cache_dtype=args.cache_dtype,
        out=args.out,
        progress=not args.quiet,
    )
    print(report.table())
    print("\n" + report.protocol_line())
    for name, info in report.backbones.items():
        best = report.best(name)
        print(
            f"\n{name}: frozen passes {info['frozen_seconds']:.1f} s "
            f"({'cache hit' if info['train_pass']['hit'] else 'computed'}), heads "
            f"{info['heads_seconds']:.1f} s; best on validation: {best.layer} {best.head} "
            f"(test accuracy {100 * best.test_accuracy:.1f}%)"
        )
    print("\nreport: " + ", ".join(report.files.values()))
    return 0


def add_probe_parser(sub: Any) -> None:
    """Add the ``probe`` subcommand to the ``fastft`` command's subparsers ``sub``."""
    p = sub.add_parser(
        "probe",
        help="compare layers x heads of a backbone from one frozen pass (MiniLM/BBC, digits)",
        description=__doc__.split("\n\n")[0] + " See docs/probe.md.",
    )
    p.add_argument("--task", choices=["bbc", "digits"], default="bbc")
    p.add_argument("--limit", type=_positive, default=None, help="samples per class (quick runs)")
    p.add_argument("--max-seq-length", type=int, default=128, help="MiniLM tokens (bbc)")
    p.add_argument("--pretrain-epochs", type=int, default=15, help="digits CNN on 0-4")
    p.add_argument("--heads", type=_heads, default=list(HEADS), help="comma list of heads")
    p.add_argument("--lrs", type=_floats, default=list(DEFAULT_LRS), help="comma list")
    p.add_argument("--weight-decays", type=_floats, default=list(DEFAULT_WEIGHT_DECAYS))
    p.add_argument("--Cs", type=_floats, default=list(DEFAULT_CS), help="logreg C grid")
    p.add_argument("--ks", type=_ints, default=list(DEFAULT_KS), help="kNN k grid")
    p.add_argument("--epochs", type=_positive, default=10, help="linear and MLP head epochs")
    p.add_argument("--concat-last", type=_positive, default=None, help="also probe the last n taps")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--shots", type=_positive, default=None, help="few-shot: rows per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", choices=["disk", "host", "device", "auto"], default="disk")
    p.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="fp16")
    p.add_argument("--out", default="fastft-probe", help="report folder (default ./fastft-probe)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_probe)
