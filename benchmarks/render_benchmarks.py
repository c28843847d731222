"""Copy benchmark results from a results folder into docs/benchmarks.md.

Each suite's ``<suite>.json`` in the results folder (written by ``benchmarks/conftest.py``)
becomes a table between ``<!-- <suite>:start -->`` and ``<!-- <suite>:end -->`` in
docs/benchmarks.md, so the figures there are always measured ones. A suite without markers
in the document, or without results in the folder, is left as it is.

Rewriting the document is always this explicit command, never a side effect of a run::

    .venv/bin/python benchmarks/render_benchmarks.py [RESULTS_DIR] [--document PATH]

RESULTS_DIR defaults to ``.benchmarks/results`` (where ``pytest benchmarks`` and
``fastft bench --kernels`` write without ``--results-dir``); ``make bench`` runs the suites
and then this. The figures committed in ``benchmarks/results`` are the record the document
was last rendered from: ``render_benchmarks.py benchmarks/results`` reproduces it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / ".benchmarks" / "results"  # the default of benchmarks/conftest.py


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def table(payload: dict) -> str:
    """The rows of one suite's results as a Markdown table, with the date and machine."""
    lines = [
        "| case | baseline | baseline (ms) | measured | time (ms) | speed-up |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in payload["rows"]:
        speedup = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        lines.append(
            f"| {r['case']} | {r['baseline']} | {_ms(r['baseline_ms'])} | {r['impl']} | "
            f"{_ms(r['median_ms'])} | {speedup} |"
        )
    lines.append(f"\n_Measured {payload['date']} on {payload['machine']}._")
    return "\n".join(lines)


def suites(results: Path) -> dict[str, dict]:
    """The pytest-benchmark suites' payloads in ``results``, by suite name."""
    found = {}
    for path in sorted(results.glob("*.json")):
        payload = json.loads(path.read_text())
        rows = payload.get("rows") if isinstance(payload, dict) else None
        if not isinstance(rows, list) or not rows or "baseline" not in rows[0]:
            continue  # not a pytest-benchmark suite (e2e.json, unfreeze.json, ratios)
        if "suite" not in payload:
            continue
        found[payload["suite"]] = payload
    return found


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked suite's table replaced by the one in ``results``."""
    for name, payload in suites(results).items():
        suite = re.escape(name)
        pattern = re.compile(rf"(<!-- {suite}:start -->\n).*?(\n<!-- {suite}:end -->)", re.S)
        rendered = table(payload)
        text = pattern.sub(lambda m, rendered=rendered: m.group(1) + rendered + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Copy benchmark results into docs/benchmarks.md.")
    ap.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=RESULTS,
        help=f"results folder of a benchmark run (default {RESULTS})",
    )
    ap.add_argument(
        "--document", type=Path, default=DOCUMENT, help=f"the document (default {DOCUMENT})"
    )
    args = ap.parse_args(argv)
    found = suites(args.results) if args.results.is_dir() else {}
    if not found:
        print(f"render_benchmarks: no suite results in {args.results}", file=sys.stderr)
        return 1
    text = args.document.read_text()
    rendered = render(text, args.results)
    if rendered != text:
        args.document.write_text(rendered)
    marked = sorted(name for name in found if f"<!-- {name}:start -->" in text)
    unmarked = sorted(set(found) - set(marked))
    print(
        f"rendered {', '.join(marked) or 'no suite'} from {args.results} into {args.document}"
        + (f" (no markers for {', '.join(unmarked)})" if unmarked else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
