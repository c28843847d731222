"""What a probe found, as a person reads it: a table, a heatmap per backbone, JSON and CSV.

One row per backbone × layer × head: the hyper-parameters chosen on the validation rows, the
validation and test accuracy of that choice, and the seconds the head's whole grid took.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ProbeRow", "ProbeReport"]

COLUMNS = ("backbone", "layer", "head", "chosen", "val_accuracy", "test_accuracy", "seconds")


@dataclass
class ProbeRow:
    """One backbone × layer × head.

    Attributes:
        backbone: the backbone's name (a key of ``backbones``).
        layer: the tap (a module name, or ``concat(last n)``).
        head: ``linear``, ``mlp``, ``logreg`` or ``knn``.
        chosen: the hyper-parameters chosen on the validation rows.
        val_accuracy: the validation accuracy of that choice.
        test_accuracy: the test accuracy of that choice (the test rows scored once).
        seconds: the time the head's whole grid took on this tap (fit, choice, test).
        grid: every setting of the grid with its validation accuracy.
    """

    backbone: str
    layer: str
    head: str
    chosen: dict
    val_accuracy: float
    test_accuracy: float
    seconds: float
    grid: list[dict] = field(default_factory=list)

    def flat(self) -> dict:
        """The row as one line of the CSV (the chosen setting as ``k=v`` pairs)."""
        return {
            "backbone": self.backbone,
            "layer": self.layer,
            "head": self.head,
            "chosen": " ".join(f"{k}={_short(v)}" for k, v in self.chosen.items()),
            "val_accuracy": round(self.val_accuracy, 6),
            "test_accuracy": round(self.test_accuracy, 6),
            "seconds": round(self.seconds, 4),
        }


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).replace(" ", "")


@dataclass
class ProbeReport:
    """The result of :func:`fastft.probe`.

    Attributes:
        rows: one :class:`ProbeRow` per backbone × layer × head.
        protocol: the split (seed, validation fraction, shots, the rows of each part).
        backbones: per backbone, its frozen passes (seconds, cache hits, fingerprints).
        seconds: the whole probe's wall time.
        files: the files :meth:`write` wrote (name → path).
    """

    rows: list[ProbeRow]
    protocol: dict
    backbones: dict[str, dict]
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def best(self, backbone: str | None = None) -> ProbeRow:
        """The row with the best validation accuracy: the choice the protocol makes; its test
        accuracy is the figure to quote.

        Args:
            backbone: only this backbone's rows (default: all rows).
        """
        rows = [r for r in self.rows if backbone is None or r.backbone == backbone]
        return max(rows, key=lambda r: r.val_accuracy)

    def table(self) -> str:
        """The rows as a Markdown table."""
        head = ["backbone", "layer", "head", "chosen", "val acc", "test acc", "seconds"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            f = r.flat()
            lines.append(
                f"| {f['backbone']} | {f['layer']} | {f['head']} | {f['chosen']} | "
                f"{100 * r.val_accuracy:.1f} | {100 * r.test_accuracy:.1f} | {r.seconds:.2f} |"
            )
        return "\n".join(lines)

    def protocol_line(self) -> str:
        """The protocol in one sentence (rows of each part, seed, few-shot sample)."""
        p = self.protocol
        shots = f", {p['shots']} per class (few-shot)" if p.get("shots") else ""
        return (
            f"Protocol: heads fit on {p.get('n_fit')} of {p.get('n_train')} training rows"
            f"{shots}; settings chosen on {p.get('n_val')} validation rows (val_fraction "
            f"{p.get('val_fraction')}, seed {p.get('seed')}); {p.get('n_test')} test rows "
            "scored once per chosen setting."
        )

    def to_dict(self) -> dict:
        """Everything in the report, JSON-ready."""
        return {
            "rows": [asdict(r) for r in self.rows],
            "protocol": self.protocol,
            "backbones": self.backbones,
            "seconds": self.seconds,
        }

    def write(self, out: str | Path) -> dict[str, str]:
        """Write ``probe.json``, ``probe.csv``, ``probe.md`` and ``probe_heatmap.png`` (test
        accuracy over layer × head, one panel per backbone; skipped with a warning without
        matplotlib); returns their paths by kind.

        Args:
            out: the folder (made when missing).
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / "probe.json",
            "csv": out / "probe.csv",
            "markdown": out / "probe.md",
            "heatmap": out / "probe_heatmap.png",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(r.flat() for r in self.rows)
        paths["markdown"].write_text(self.table() + "\n\n" + self.protocol_line() + "\n")
        try:
            heatmap(self, paths["heatmap"])
        except ImportError:
            paths.pop("heatmap").unlink(missing_ok=True)  # not a stale one from an earlier run
            warnings.warn(
                "no heatmap written: it needs matplotlib (pip install 'fastft[plot]').",
                stacklevel=2,
            )
        self.files = {k: str(v) for k, v in paths.items()}
        return self.files


def heatmap(report: ProbeReport, path: Path) -> None:
    """Test accuracy over layer (rows) × head (columns), one panel per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.backbone for r in report.rows))
    heads = list(dict.fromkeys(r.head for r in report.rows))
    panels = []
    for b in names:
        layers = list(dict.fromkeys(r.layer for r in report.rows if r.backbone == b))
        grid = [[float("nan")] * len(heads) for _ in layers]
        for r in report.rows:
            if r.backbone == b:
                grid[layers.index(r.layer)][heads.index(r.head)] = 100 * r.test_accuracy
        panels.append((b, layers, grid))
    values = [v for _, _, grid in panels for row in grid for v in row if v == v]
    low, high = (min(values), max(values)) if values else (0.0, 100.0)
    low, high = (low - 0.5, high + 0.5) if high - low < 1 else (low, high)  # a visible scale
    height = max(len(p[1]) for p in panels) * 0.45 + 1.5
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.2 + 1.3 * len(heads) * len(panels), height), squeeze=False
    )
    for ax, (b, layers, grid) in zip(axes[0], panels):
        im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=low, vmax=high)
        ax.set_xticks(range(len(heads)), heads)
        ax.set_yticks(range(len(layers)), axis_labels(layers))
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(
                        j,
                        i,
                        f"{v:.1f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="w" if v < low + 0.6 * (high - low) else "k",  # viridis
                    )
        ax.set_title(f"{b}: test accuracy (%)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def axis_labels(layers: list[str]) -> list[str]:
    """Taps' names shortened for an axis: the last two parts of each, or as many more as
    keep them distinct (``encoder.layer.1`` and ``decoder.layer.1``)."""
    parts = [layer.split(".") for layer in layers]
    for n in range(2, max(map(len, parts), default=2) + 1):
        labels = [".".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(layers)
