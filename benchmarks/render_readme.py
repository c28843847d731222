"""Copy the latest benchmark results into README.md.

Each suite's ``benchmarks/results/<suite>.json`` (written by ``benchmarks/conftest.py``)
becomes a table between ``<!-- <suite>:start -->`` and ``<!-- <suite>:end -->`` in the
README, so the figures there are always the measured ones. Run after the benchmarks:
``.venv/bin/python benchmarks/render_readme.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def table(payload: dict) -> str:
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


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        payload = json.loads(path.read_text())
        if "rows" not in payload or not payload["rows"] or "baseline" not in payload["rows"][0]:
            continue
        suite = payload["suite"]
        pattern = re.compile(
            rf"(<!-- {re.escape(suite)}:start -->\n).*?(\n<!-- {re.escape(suite)}:end -->)", re.S
        )
        rendered = table(payload)
        text = pattern.sub(lambda m, rendered=rendered: m.group(1) + rendered + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
