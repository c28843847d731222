"""The demo's outputs: a terminal table, report.json, report.md and speedup.png."""

from __future__ import annotations

import json
from pathlib import Path


def table(report: dict) -> str:
    rows = [
        (
            "run",
            "method",
            "backbone forward passes",
            "training s",
            "test pass s",
            "test accuracy",
            "speed-up",
        )
    ]
    naive = next(r for r in report["runs"] if r["method"] == "naive")
    for r in report["runs"]:
        secs = f"{r['seconds']:.1f}" + ("" if r["measured"] else " (projected)")
        speed = f"{naive['seconds'] / r['seconds']:.1f}x"
        acc = f"{100 * r['test_accuracy']:.2f}%" + (
            "" if r["method"] == "fastft" or r["measured"] else f" after {r['epochs']} ep"
        )
        rows.append(
            (
                r["name"],
                r["method"],
                f"{r['forward_passes']:,}",
                secs,
                f"{r['eval_seconds']:.1f}",
                acc,
                speed,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    naive = next(r for r in report["runs"] if r["method"] == "naive")
    lines = [
        f"# fastft demo: {report['task']}",
        "",
        f"{report['train_articles']} training and {report['test_articles']} test articles, "
        f"max_seq_length {report['max_seq_length']}, {report['epochs']} epochs; "
        f"{report['machine']}.",
        "",
        (
            "| run | method | backbone forward passes | training seconds | test pass seconds "
            "| test accuracy | speed-up (training) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        secs = f"{r['seconds']:.1f}" + (" (measured)" if r["measured"] else " (projected)")
        speed = f"{naive['seconds'] / r['seconds']:.1f}×"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['forward_passes']:,} | {secs} | "
            f"{r['eval_seconds']:.1f} | {100 * r['test_accuracy']:.2f}% | {speed} |"
        )
    how = (
        "measured"
        if report["speedup_measured"]
        else "naive time projected from measured per-epoch times"
    )
    lines += [
        "",
        "- Speed-up of fastft over the naive loop (configuration A): "
        f"**{report['speedup_vs_naive']:.1f}×** ({how}); "
        "training time: the frozen pass(es) over the training set plus the epochs; the one test "
        "pass, paid by both, is reported apart "
        f"(with it: {report['speedup_with_evaluation']:.1f}×).",
        "- fastft training time / (one frozen pass over the training set, the first epoch of "
        f"the {report.get('ideal_pass', 'naive')} loop, + {report['epochs']} head-only epochs): "
        f"{report['fastft_vs_ideal']:.2f}.",
        f"- Test accuracy, fastft minus naive after the same {naive['epochs']} epoch(s): "
        f"{report['accuracy_gap_points']:+.2f} points.",
    ]
    if report.get("speedup_vs_naive_bf16") is not None:
        lines.append(
            "- Against the naive loop under bf16 autocast: "
            f"**{report['speedup_vs_naive_bf16']:.1f}×**; test accuracy, fastft minus naive bf16 "
            f"after the same epochs: {report['accuracy_gap_points_bf16']:+.2f} points."
        )
    for r in report["runs"]:
        if r["notes"]:
            lines.append(f"- {r['name']} ({r['method']}): {r['notes']}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = report["epochs"]
    xs = list(range(0, epochs + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in report["runs"]:
        per_epoch = sum(r["per_epoch_seconds"]) / len(r["per_epoch_seconds"])
        if r["method"].startswith("naive"):
            measured, color = r["epochs"], "tab:red" if r["method"] == "naive" else "tab:orange"
            cum = [
                r["setup_seconds"] + sum(r["per_epoch_seconds"][:e])
                if e <= measured
                else r["setup_seconds"] + sum(r["per_epoch_seconds"]) + (e - measured) * per_epoch
                for e in xs
            ]
            ax.plot(
                xs[: measured + 1],
                cum[: measured + 1],
                "o-",
                color=color,
                label=f"{r['method']} (measured)",
            )
            if measured < epochs:
                ax.plot(
                    xs[measured:],
                    cum[measured:],
                    "--",
                    color=color,
                    label=f"{r['method']} (projected)",
                )
        else:
            cum = [r["setup_seconds"] + sum(r["per_epoch_seconds"][:e]) for e in xs]
            ax.plot(xs, cum, "o-", label=f"fastft {r['name'][:2].strip(':')}")
    ax.set_xlabel("epochs")
    ax.set_ylabel("seconds (cumulative)")
    ax.set_title(f"{report['task']}: time vs epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "speedup.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    paths["md"].write_text(markdown(report))
    try:
        plot(report, paths["png"])
    except ImportError:
        del paths["png"]
    return paths
