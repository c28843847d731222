"""Copy the latest benchmark results into docs/benchmarks.md.

Each suite's ``benchmarks/results/<suite>.json`` (written by ``benchmarks/conftest.py``)
becomes a table between ``<!-- <suite>:start -->`` and ``<!-- <suite>:end -->`` in
docs/benchmarks.md, so the figures there are always the measured ones. A suite without
markers in the document is left out. Run after the benchmarks (``fastft bench --kernels``
does): ``.venv/bin/python benchmarks/render_benchmarks.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"


def table(payload: dict) -> str:
    """The rows of one suite's results as a Markdown table, with the date and machine."""
    lines = [
        "| case | baseline | baseline (ms) | measured | time (ms) | speed-up |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['baseline_ms']:.3f} | {r['impl']} | "
            f"{r['median_ms']:.3f} | {r['speedup']:.2f}× |"
        )
    lines.append(f"\n_Measured {payload['date']} on {payload['machine']}._")
    return "\n".join(lines)


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked suite's table replaced by the one in ``results``."""
    for path in sorted(results.glob("*.json")):
        payload = json.loads(path.read_text())
        rows = payload.get("rows") if isinstance(payload, dict) else None
        if not rows or "baseline" not in rows[0] or "suite" not in payload:
            continue  # not a pytest-benchmark suite (e2e.json, unfreeze.json, ratios)
        suite = re.escape(payload["suite"])
        pattern = re.compile(rf"(<!-- {suite}:start -->\n).*?(\n<!-- {suite}:end -->)", re.S)
        rendered = table(payload)
        text = pattern.sub(lambda m, rendered=rendered: m.group(1) + rendered + m.group(2), text)
    return text


def main() -> None:
    text = DOCUMENT.read_text()
    rendered = render(text)
    if rendered != text:
        DOCUMENT.write_text(rendered)


if __name__ == "__main__":
    main()
