"""``fastft bench``: end-to-end naive vs fastft, measured in one run.

For each task (``bbc``: all-MiniLM-L6-v2 on BBC News; ``cnn``: the digits demo's CNN,
pretrained on digits 0–4 and transferred to 5–9) and each epoch count E in ``epochs``:

- **naive**: plain PyTorch frozen fine-tuning, the frozen part (eval mode, no_grad) run on
  every batch of every epoch. One run of max(E) epochs; its cumulative time after each E is
  a row (test evaluations are timed apart and not counted).
- **fastft**: :class:`fastft.FineTuner` for every cache dtype × tier × extraction mode
  (``extract_amps``: ``fp32``, ``auto`` = bf16 where the device computes it natively), each
  into a fresh cache (so its one frozen pass is really measured): cache build + E head
  epochs; the ``extract`` column says which precision the pass ran in.

Both start from the same seeded head and draw the same batch order, so their accuracies
differ only by the cache's storage dtype. Each row: task, method, dtype, tier, epochs,
seconds, backbone forward passes (samples through the frozen part during training),
test accuracy, speed-up = naive seconds / fastft seconds at the same E, from this run.
Results go to ``<out>/e2e[_quick].csv``, ``.json`` and ``.png``.

Run time on a 2-core CPU: ``--quick`` (250 articles at 64 tokens) 2–4 minutes; the default
(all 1780 training articles at 128 tokens: the naive loop alone is 10 frozen passes of
~30 s, and each of the 6 fastft runs one more) about 10 minutes (measured: 10 min 7 s). The
JSON records the load average: other processes on the machine slow every row, the head
epochs most.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import fastft
from fastft.bench.tasks import TASKS, BenchSettings, Task, accuracy, index_rows, machine

FIELDS = [
    "task",
    "method",
    "dtype",
    "tier",
    "extract",
    "epochs",
    "seconds",
    "forward_passes",
    "accuracy",
    "speedup",
    "build_seconds",
    "head_epoch_seconds",
    "cache_bytes",
]


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
        for start in tqdm(
            range(0, n, s.batch_size),
            desc=f"{task.name} naive epoch {epoch}",
            leave=False,
            disable=not s.verbose,
            unit="batch",
        ):
            rows = perm[start : start + s.batch_size]
            with torch.no_grad():
                feats = task.frozen(index_rows(X, rows))
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(head(feats), y[rows]).backward()
            opt.step()
        elapsed += time.perf_counter() - t0
        if epoch in s.epochs:
            out[epoch] = {
                "seconds": elapsed,
                "accuracy": accuracy(task.frozen, head, task.test),
                "forward_passes": epoch * n,
            }
    return out


def run_fastft(
    task: Task, s: BenchSettings, dtype: str, tier: str, amp: str = "auto"
) -> dict[int, dict]:
    """FineTuner on a fresh cache: {E: seconds (build + E epochs), accuracy after E}."""
    accuracy, eval_seconds = {}, [0.0]

    def probe(ft, record):  # test accuracy at the benchmarked epochs, timed apart
        if record["epoch"] in s.epochs:
            t0 = time.perf_counter()
            accuracy[record["epoch"]] = float(ft.evaluate(task.test)["accuracy"])
            eval_seconds[0] += time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as cache_dir:
        ft = fastft.FineTuner(
            copy.deepcopy(task.model),
            head=copy.deepcopy(task.head),
            cache=tier,
            cache_dtype=dtype,
            cache_dir=cache_dir,
            extract_amp=amp,
            seed=s.seed,
            verbose=s.verbose,
        )
        t0 = time.perf_counter()
        history = ft.fit(
            task.train, epochs=max(s.epochs), batch_size=s.batch_size, lr=s.lr, callbacks=[probe]
        )
        total = time.perf_counter() - t0 - eval_seconds[0]
        epoch_seconds = [float(r["seconds"]) for r in history]
        build = total - sum(epoch_seconds)
        tele, nbytes = ft.cache.telemetry, ft.cache.nbytes
        extract = "bf16" if "bf16 autocast" in ft.cache.parts["dtype"] else "fp32"
    if tele.get("hit"):  # would make the measurement meaningless: say so loudly
        raise fastft.CacheError(
            f"bench: the {dtype}/{tier} cache was reused ({tele.get('reason')}); "
            "every configuration must run its frozen pass."
        )
    return {
        e: {
            "seconds": build + sum(epoch_seconds[:e]),
            "accuracy": accuracy.get(e),
            "forward_passes": int(tele.get("rows_computed", len(task.train[1]))),
            "build_seconds": build,
            "head_epoch_seconds": sum(epoch_seconds) / len(epoch_seconds),
            "cache_bytes": int(nbytes),
            "extract": extract,
        }
        for e in s.epochs
    }


# ---------------------------------------------------------------------------- the run
def run(s: BenchSettings, log: Callable[[str], None] = print) -> list[dict]:
    """Every row of the benchmark (see the module docstring)."""
    rows: list[dict] = []
    for name in s.tasks:
        if name not in TASKS:
            raise fastft.FastFTValueError(f"unknown bench task {name!r}; use {', '.join(TASKS)}.")
        log(f"[{name}] preparing the pretrained model and the data")
        task = TASKS[name](s)
        log(
            f"[{name}] {len(task.train[1])} train / {len(task.test[1])} test samples; naive loop, "
            f"{max(s.epochs)} epochs"
        )
        naive = run_naive(task, s)
        for e, r in naive.items():
            rows.append(
                {
                    "task": name,
                    "method": "naive",
                    "dtype": "fp32",
                    "tier": "-",
                    "extract": "fp32",
                    "epochs": e,
                    "seconds": r["seconds"],
                    "forward_passes": r["forward_passes"],
                    "accuracy": r["accuracy"],
                    "speedup": 1.0,
                }
            )
        for amp in s.extract_amps:
            for dtype in s.dtypes:
                for tier in s.tiers:
                    log(f"[{name}] fastft {dtype}/{tier}, extract_amp={amp}")
                    for e, r in run_fastft(task, s, dtype, tier, amp).items():
                        rows.append(
                            {
                                "task": name,
                                "method": "fastft",
                                "dtype": dtype,
                                "tier": tier,
                                "epochs": e,
                                **r,
                                "speedup": naive[e]["seconds"] / r["seconds"],
                            }
                        )
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
    # Other processes on the machine slow every row; the load average tells a reader how quiet
    # it was.
    load = dict(zip(("load_1min", "load_5min", "load_15min"), os.getloadavg()))
    paths["json"].write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "machine": machine(),
                "load_average": load,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "rows": rows,
            },
            indent=2,
        )
    )
    plot(rows, paths["png"])
    return paths


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
        for key in dict.fromkeys(
            (r["method"], r["dtype"], r["tier"], r.get("extract", "fp32")) for r in mine
        ):
            pts = sorted(
                (r["epochs"], r["seconds"])
                for r in mine
                if (r["method"], r["dtype"], r["tier"], r.get("extract", "fp32")) == key
            )
            if key[0] == "naive":
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    lw=2.5,
                    color="tab:red",
                    label="naive (frozen part every epoch)",
                )
            else:  # colour = cache dtype, line style = tier, square markers = a bf16 pass
                ax.plot(
                    *zip(*pts),
                    lw=1.3,
                    color=DTYPE_COLORS.get(key[1], "tab:gray"),
                    ls="--" if key[2] == "disk" else "-",
                    marker="s" if key[3] == "bf16" else "o",
                    label=f"fastft {key[1]} / {key[2]} ({key[3]} pass)",
                )
        last = max(r["epochs"] for r in mine)
        best = max(
            (r for r in mine if r["method"] == "fastft" and r["epochs"] == last),
            key=lambda r: r["speedup"],
            default=None,
        )
        title = f"{task}: seconds to train vs epochs"
        if best:
            title += (
                f"\nbest speed-up at {last} epochs: {best['speedup']:.1f}x "
                f"({best['dtype']}/{best['tier']})"
            )
        ax.set(title=title, xlabel="epochs", ylabel="seconds (measured)")
        ax.set_xticks(sorted({r["epochs"] for r in mine}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (what docs/benchmarks.md shows)."""
    lines = [
        "| task | method | cache | epochs | seconds | forward passes | test accuracy | speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cache = (
            "-"
            if r["method"] == "naive"
            else f"{r['dtype']}/{r['tier']}, {r.get('extract', 'fp32')} pass"
        )
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(
            f"| {r['task']} | {r['method']} | {cache} | {r['epochs']} | {r['seconds']:.2f} | "
            f"{r['forward_passes']:,} | {acc} | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines)
