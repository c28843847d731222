"""Shared benchmark plumbing: record medians per (case, implementation) and report ratios.

Every suite measures the contenders of one case in the same run (this machine is shared
and noisy, so only ratios measured side by side mean anything), then writes
``<suite>.json`` and ``.csv`` into the results folder and prints a table at the end.

The results folder is ``--results-dir DIR``; without it, ``.benchmarks/results`` in the
checkout (git-ignored). A run never writes tracked files: the figures committed in
``benchmarks/results`` (the record docs/benchmarks.md was rendered from) change only when
a run is pointed there explicitly (``--results-dir benchmarks/results``).
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

# The default results folder: git-ignored (.gitignore lists .benchmarks/).
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / ".benchmarks" / "results"
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


def pytest_addoption(parser):
    parser.addoption(
        "--results-dir",
        default=None,
        metavar="DIR",
        help=f"folder for the benchmark results (<suite>.json, .csv); default {DEFAULT_RESULTS}",
    )


def results_folder(config) -> Path:
    """The folder this run writes its results into (created when first written)."""
    given = config.getoption("results_dir", default=None)
    if not given:
        return DEFAULT_RESULTS
    return (config.invocation_params.dir / Path(given).expanduser()).resolve()


@pytest.fixture(scope="session")
def results_dir(request) -> Path:
    """The results folder of this run, created: suites write their extra figures here."""
    folder = results_folder(request.config)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    results = results_folder(session.config)
    results.mkdir(parents=True, exist_ok=True)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
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
        (results / f"{suite}.json").write_text(json.dumps(payload, indent=2))
        with open(results / f"{suite}.csv", "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        if tr is not None:
            tr.write_sep("=", f"{suite}: speed-up = baseline time / time ({machine})")
            for r in rows:
                tr.write_line(
                    f"  {r['case']:<48} {r['impl']:<10} {r['median_ms']:>10.3f} ms  "
                    f"vs {r['baseline']:<10} {r['baseline_ms']} ms  x{r['speedup']}"
                )
    if tr is not None:
        tr.write_line(f"results in {results}")
