"""``fastft bench``: end-to-end naive vs fastft, measured in one run.

For each task (``bbc``: all-MiniLM-L6-v2 on BBC News; ``cnn``: the digits demo's CNN,
pretrained on digits 0–4 and transferred to 5–9) and each epoch count E in ``epochs``:

- **naive**: plain PyTorch frozen fine-tuning, the frozen part (eval mode, no_grad) run on
  every batch of every epoch. One run of max(E) epochs; its cumulative time after each E is
  a row (test evaluations are timed apart and not counted).
- **fastft**: :class:`fastft.FineTuner` for every cache dtype × tier, each into a fresh
  cache (so its one frozen pass is really measured): cache build + E head epochs.

Both start from the same seeded head and draw the same batch order, so their accuracies
differ only by the cache's storage dtype. Each row: task, method, dtype, tier, epochs,
seconds, backbone forward passes (samples through the frozen part during training),
test accuracy, speed-up = naive seconds / fastft seconds at the same E, from this run.
Results go to ``<out>/e2e[_quick].csv``, ``.json`` and ``.png``.

Run time on a 2-core CPU: ``--quick`` (250 articles at 64 tokens) 2–4 minutes; the default
(all 1780 training articles at 128 tokens: the naive loop alone is 10 frozen passes of
~30 s, and each of the 6 fastft runs one more) about 10 minutes (measured: 10 min 7 s). The JSON records the load
average: other processes on the machine slow every row, the head epochs most.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

import fastft

FIELDS = ["task", "method", "dtype", "tier", "epochs", "seconds", "forward_passes", "accuracy", "speedup",
          "build_seconds", "head_epoch_seconds", "cache_bytes"]


@dataclass
class BenchSettings:
    tasks: tuple[str, ...] = ("bbc", "cnn")
    epochs: tuple[int, ...] = (1, 3, 10)
    dtypes: tuple[str, ...] = ("fp32", "fp16", "int8")
    tiers: tuple[str, ...] = ("host", "disk")
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


# ---------------------------------------------------------------------------- tasks
def _seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def bbc_task(s: BenchSettings) -> Task:
    """all-MiniLM-L6-v2 (frozen transformer + pooling + normalize) + a new 384-256-5 head."""
    from fastft.demo.bbc_data import load_bbc, load_minilm, stratified_split, tokenize

    model = load_minilm(s.max_seq_length).eval()
    texts, labels, classes = load_bbc(s.per_class_limit)
    train_idx, test_idx = stratified_split(labels, 0.2, s.seed)
    tokens = tokenize(model, texts, s.max_seq_length)
    pick = lambda idx: {k: v[idx] for k, v in tokens.items()}  # noqa: E731
    dim = model.get_sentence_embedding_dimension()
    head = _seeded(lambda: nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, len(classes))), s.seed)
    return Task("bbc", "all-MiniLM-L6-v2 on BBC News", model, lambda x: model(x)["sentence_embedding"], head,
                (pick(train_idx), labels[train_idx]), (pick(test_idx), labels[test_idx]),
                {"max_seq_length": s.max_seq_length, "per_class_limit": s.per_class_limit})


def cnn_task(s: BenchSettings) -> Task:
    """The digits demo's CNN pretrained on 0–4; frozen convs, a new Linear head for 5–9."""
    from fastft.demo.digits import DigitsCNN, load_digits

    X, y = load_digits()
    low, high = y < 5, y >= 5
    (Xa, ya), _ = _split(X[low], y[low], s.seed)
    train, test = _split(X[high], y[high] - 5, s.seed)
    torch.manual_seed(s.seed)
    model = DigitsCNN(5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(s.seed)
    for _ in range(15):  # pretraining on 0-4: not part of what is measured
        perm = torch.randperm(len(ya), generator=g)
        for start in range(0, len(ya), 32):
            rows = perm[start:start + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xa[rows]), ya[rows]).backward()
            opt.step()
    model.eval()
    head = _seeded(lambda: nn.Linear(model.fc.in_features, 5), s.seed)
    return Task("cnn", "digits CNN, 0-4 -> 5-9", model, model.features, head, train, test)


def _split(X, y, seed):
    """80/20 split after a seeded shuffle."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (X[perm[:cut]], y[perm[:cut]]), (X[perm[cut:]], y[perm[cut:]])


TASKS = {"bbc": bbc_task, "cnn": cnn_task}


# ---------------------------------------------------------------------------- the two methods
def _index(x, rows):
    return {k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]


def _accuracy(frozen, head: nn.Module, data, batch_size: int = 256) -> float:
    X, y = data
    head.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(y)))
            correct += int((head(frozen(_index(X, rows))).argmax(-1) == y[rows]).sum())
    return correct / len(y)


def run_naive(task: Task, s: BenchSettings) -> dict[int, dict]:
    """Naive frozen fine-tuning for max(epochs) epochs: {E: seconds, accuracy} after each E."""
    head = copy.deepcopy(task.head)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    X, y = task.train
    n, elapsed, out = len(y), 0.0, {}
    for epoch in range(1, max(s.epochs) + 1):
        head.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=g)
        for start in tqdm(range(0, n, s.batch_size), desc=f"{task.name} naive epoch {epoch}", leave=False,
                          disable=not s.verbose, unit="batch"):
            rows = perm[start:start + s.batch_size]
            with torch.no_grad():
                feats = task.frozen(_index(X, rows))
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(head(feats), y[rows]).backward()
            opt.step()
        elapsed += time.perf_counter() - t0
        if epoch in s.epochs:
            out[epoch] = {"seconds": elapsed, "accuracy": _accuracy(task.frozen, head, task.test),
                          "forward_passes": epoch * n}
    return out


def run_fastft(task: Task, s: BenchSettings, dtype: str, tier: str) -> dict[int, dict]:
    """FineTuner on a fresh cache: {E: seconds (build + E epochs), accuracy after E}."""
    accuracy, eval_seconds = {}, [0.0]

    def probe(ft, record):  # test accuracy at the benchmarked epochs, timed apart
        if record["epoch"] in s.epochs:
            t0 = time.perf_counter()
            accuracy[record["epoch"]] = float(ft.evaluate(task.test)["accuracy"])
            eval_seconds[0] += time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as cache_dir:
        ft = fastft.FineTuner(copy.deepcopy(task.model), head=copy.deepcopy(task.head), cache=tier,
                              cache_dtype=dtype, cache_dir=cache_dir, seed=s.seed, verbose=s.verbose)
        t0 = time.perf_counter()
        history = ft.fit(task.train, epochs=max(s.epochs), batch_size=s.batch_size, lr=s.lr, callbacks=[probe])
        total = time.perf_counter() - t0 - eval_seconds[0]
        epoch_seconds = [float(r["seconds"]) for r in history]
        build = total - sum(epoch_seconds)
        tele, nbytes = ft.cache.telemetry, ft.cache.nbytes
    if tele.get("hit"):  # would make the measurement meaningless: say so loudly
        raise fastft.CacheError(f"bench: the {dtype}/{tier} cache was reused ({tele.get('reason')}); "
                                "every configuration must run its frozen pass.")
    return {e: {"seconds": build + sum(epoch_seconds[:e]), "accuracy": accuracy.get(e),
                "forward_passes": int(tele.get("rows_computed", len(task.train[1]))),
                "build_seconds": build, "head_epoch_seconds": sum(epoch_seconds) / len(epoch_seconds),
                "cache_bytes": int(nbytes)}
            for e in s.epochs}


# ---------------------------------------------------------------------------- the run
def run(s: BenchSettings, log: Callable[[str], None] = print) -> list[dict]:
    """Every row of the benchmark (see the module docstring)."""
    rows: list[dict] = []
    for name in s.tasks:
        if name not in TASKS:
            raise fastft.FastFTValueError(f"unknown bench task {name!r}; use {', '.join(TASKS)}.")
        log(f"[{name}] preparing the pretrained model and the data")
        task = TASKS[name](s)
        log(f"[{name}] {len(task.train[1])} train / {len(task.test[1])} test samples; naive loop, "
            f"{max(s.epochs)} epochs")
        naive = run_naive(task, s)
        for e, r in naive.items():
            rows.append({"task": name, "method": "naive", "dtype": "fp32", "tier": "-", "epochs": e,
                         "seconds": r["seconds"], "forward_passes": r["forward_passes"],
                         "accuracy": r["accuracy"], "speedup": 1.0})
        for dtype in s.dtypes:
            for tier in s.tiers:
                log(f"[{name}] fastft {dtype}/{tier}")
                for e, r in run_fastft(task, s, dtype, tier).items():
                    rows.append({"task": name, "method": "fastft", "dtype": dtype, "tier": tier, "epochs": e,
                                 **r, "speedup": naive[e]["seconds"] / r["seconds"]})
    return rows


def write(rows: list[dict], s: BenchSettings, out: str | Path) -> dict[str, Path]:
    """``e2e[_quick].csv``, ``.json`` (rows + settings + machine) and ``.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "e2e_quick" if s.quick else "e2e"
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in FIELDS})
    # Other processes on the machine slow every row; the load average tells a reader how quiet it was.
    load = dict(zip(("load_1min", "load_5min", "load_15min"), os.getloadavg()))
    paths["json"].write_text(json.dumps({"settings": asdict(s), "machine": _machine(), "load_average": load,
                                         "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2))
    plot(rows, paths["png"])
    return paths


def _machine() -> str:
    import platform

    return (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"CUDA {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
            f"native kernels {'on' if fastft.has_native() else 'off'}")


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


DTYPE_COLORS = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green", "int8": "tab:purple"}


def plot(rows: list[dict], path: Path) -> None:
    """Seconds vs epochs per task: the naive loop and every fastft dtype/tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        for key in dict.fromkeys((r["method"], r["dtype"], r["tier"]) for r in mine):
            pts = sorted((r["epochs"], r["seconds"]) for r in mine if (r["method"], r["dtype"], r["tier"]) == key)
            if key[0] == "naive":
                ax.plot(*zip(*pts), marker="o", lw=2.5, color="tab:red", label="naive (frozen part every epoch)")
            else:  # colour = cache dtype, line style = tier (red is the naive loop's alone)
                ax.plot(*zip(*pts), marker="o", lw=1.3, color=DTYPE_COLORS.get(key[1], "tab:gray"),
                        ls="--" if key[2] == "disk" else "-", label=f"fastft {key[1]} / {key[2]}")
        last = max(r["epochs"] for r in mine)
        best = max((r for r in mine if r["method"] == "fastft" and r["epochs"] == last),
                   key=lambda r: r["speedup"], default=None)
        title = f"{task}: seconds to train vs epochs"
        if best:
            title += f"\nbest speed-up at {last} epochs: {best['speedup']:.1f}x ({best['dtype']}/{best['tier']})"
        ax.set(title=title, xlabel="epochs", ylabel="seconds (measured)")
        ax.set_xticks(sorted({r["epochs"] for r in mine}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (what the README's results section shows)."""
    lines = ["| task | method | cache | epochs | seconds | forward passes | test accuracy | speed-up |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cache = "-" if r["method"] == "naive" else f"{r['dtype']}/{r['tier']}"
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(f"| {r['task']} | {r['method']} | {cache} | {r['epochs']} | {r['seconds']:.2f} | "
                     f"{r['forward_passes']:,} | {acc} | {r['speedup']:.1f}x |")
    return "\n".join(lines)
