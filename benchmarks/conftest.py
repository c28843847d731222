"""Shared benchmark plumbing: record medians per (case, implementation) and report ratios.

Every suite measures the contenders of one case in the same run (this machine is shared
and noisy, so only ratios measured side by side mean anything), then writes
``benchmarks/results/<suite>.json`` and ``.csv`` and prints a table at the end.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
_medians: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
_baselines: dict[tuple[str, str], str] = {}


class Recorder:
    def __init__(self, suite: str):
        self.suite = suite

    def run(
        self,
        benchmark,
        case: str,
        impl: str,
        fn,
        *,
        baseline: str,
        rounds: int = 15,
        warmup: int = 2,
    ):
        """Benchmark ``fn`` as ``impl`` of ``case``; ratios are baseline / impl."""
        benchmark.group = f"{self.suite}:{case}"
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        _medians[self.suite][case][impl] = benchmark.stats.stats.median
        _baselines[(self.suite, case)] = baseline


@pytest.fixture(autouse=True)
def two_threads():
    """Every suite measures on 2 threads (this machine's cores), whatever the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def recorder(request):
    suite = Path(request.node.fspath).stem.removeprefix("bench_")
    return Recorder(suite)


def pytest_sessionfinish(session, exitstatus):
    if not _medians:
        return
    RESULTS.mkdir(exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    for suite, cases in _medians.items():
        rows = []
        for case, impls in cases.items():
            baseline = _baselines[(suite, case)]
            for impl, median in impls.items():
                if impl == baseline:
                    continue
                base = impls.get(baseline)
                rows.append(
                    {
                        "case": case,
                        "impl": impl,
                        "baseline": baseline,
                        "median_ms": round(median * 1e3, 4),
                        "baseline_ms": round(base * 1e3, 4) if base else None,
                        "speedup": round(base / median, 3) if base else None,
                    }
                )
        payload = {
            "suite": suite,
            "machine": machine,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "rows": rows,
        }
        (RESULTS / f"{suite}.json").write_text(json.dumps(payload, indent=2))
        with open(RESULTS / f"{suite}.csv", "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_sep("=", f"{suite}: speed-up = baseline time / time ({machine})")
            for r in rows:
                tr.write_line(
                    f"  {r['case']:<48} {r['impl']:<10} {r['median_ms']:>10.3f} ms  "
                    f"vs {r['baseline']:<10} {r['baseline_ms']} ms  x{r['speedup']}"
                )
