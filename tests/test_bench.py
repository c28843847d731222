"""``fastft bench``: the end-to-end naive-vs-fastft benchmark, on the CPU CNN task (seconds)."""

from __future__ import annotations

import csv
import json

import pytest

import fastft
from fastft.bench import e2e as bench
from fastft.cache.amp import native_bf16
from fastft.cli import main
from fastft.train.engine import Engine

from helpers.timing import Clock, busy


@pytest.fixture(scope="module")
def cnn_rows():
    s = bench.BenchSettings(
        tasks=("cnn",),
        epochs=(1, 2),
        dtypes=("fp32", "int8"),
        tiers=("host", "disk"),
        verbose=False,
    )
    clock = Clock()  # the test's own record of when what ran: see timed_bounds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_naive", clock.wrap("naive", bench.run_naive))
        info = lambda task, s, dtype, tier, amp="auto": (dtype, tier)  # noqa: E731
        mp.setattr(bench, "run_fastft", clock.wrap("fastft", bench.run_fastft, info))
        mp.setattr(bench, "accuracy", clock.wrap("accuracy", bench.accuracy))
        mp.setattr(bench, "tqdm", clock.loop("batch"))  # the naive loop's batches
        for name, owner, attr in [
            ("evaluate", fastft.FineTuner, "evaluate"),
            ("build", fastft.FineTuner, "build_cache"),
            ("epoch", Engine, "run_epoch"),
        ]:
            mp.setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
        rows = bench.run(s, log=lambda msg: None)
    return s, rows, timed_bounds(s, clock)


def timed_bounds(s, clock):
    """{(method, dtype, tier, epochs): (lo, hi)} from the test's clock alone: the seconds a
    row may report. At most the wall time from the start of the method's run to the test
    evaluation after E epochs, less the earlier evaluations (and, for fastft, the later
    epochs); at least the time spent in work those seconds must include: the naive loop's
    batch bodies, fastft's training-cache build and epochs."""
    bounds = {}
    (naive,) = clock.find("naive")
    evals = clock.find("accuracy", within=naive)
    assert len(evals) == len(s.epochs)
    bodies = clock.find("batch", within=naive, outside=evals)
    for k, (e, ev) in enumerate(zip(s.epochs, evals)):
        hi = ev.start - naive.start - sum(x.seconds for x in evals[:k])
        bounds["naive", "fp32", "-", e] = (busy(bodies, before=ev.start), hi)
    for run in clock.find("fastft"):
        evals = clock.find("evaluate", within=run)
        epochs = clock.find("epoch", within=run)
        builds = clock.find("build", within=run, outside=evals)
        assert len(evals) == len(s.epochs) and len(epochs) == max(s.epochs) and builds
        top = run.seconds - sum(x.seconds for x in evals)
        for e, ev in zip(s.epochs, evals):
            later = sum(x.seconds for x in epochs if x.start >= ev.end)
            bounds[("fastft", *run.info, e)] = (busy(builds + epochs, before=ev.start), top - later)
        bounds[("build", *run.info)] = (busy(builds), None)
    return bounds


def test_one_row_per_method_dtype_tier_and_epoch_count(cnn_rows):
    s, rows, _ = cnn_rows
    keys = [(r["method"], r["dtype"], r["tier"], r["epochs"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 + 2 * 2 * 2
    assert {k for k in keys if k[0] == "naive"} == {
        ("naive", "fp32", "-", 1),
        ("naive", "fp32", "-", 2),
    }


def test_forward_passes_are_counted_per_epoch_for_naive_once_for_fastft(cnn_rows):
    _, rows, _ = cnn_rows
    naive = {r["epochs"]: r for r in rows if r["method"] == "naive"}
    n = naive[1]["forward_passes"]
    assert naive[2]["forward_passes"] == 2 * n  # the frozen convs ran again in epoch 2
    for r in rows:
        if r["method"] == "fastft":
            assert r["forward_passes"] == n  # once per sample, whatever the epochs


def test_times_and_speedups_agree_with_the_tests_clock(cnn_rows):
    # Every reported time lies within bounds the test measured itself, so does every speed-up:
    # containments that hold however loaded the machine is, never "fastft is faster".
    _, rows, bounds = cnn_rows
    naive = {r["epochs"]: r["seconds"] for r in rows if r["method"] == "naive"}
    for r in rows:
        key = (r["method"], r["dtype"], r["tier"], r["epochs"])
        lo, hi = bounds[key]
        assert 0 < lo <= r["seconds"] <= hi, (key, lo, r["seconds"], hi)
        if r["method"] == "naive":
            assert r["speedup"] == 1.0
            continue
        build_lo, _ = bounds["build", r["dtype"], r["tier"]]
        assert 0 < build_lo <= r["build_seconds"] < r["seconds"], key
        n_lo, n_hi = bounds["naive", "fp32", "-", r["epochs"]]
        assert r["speedup"] == pytest.approx(naive[r["epochs"]] / r["seconds"])
        assert n_lo / hi <= r["speedup"] <= n_hi / lo, (key, n_lo / hi, r["speedup"], n_hi / lo)


def test_fp32_cache_trains_the_same_head_as_the_naive_loop(cnn_rows):
    # Same seeded head, same batch order, fp32 features: the oracle says the same weights,
    # hence the same test accuracy; int8 stays close.
    _, rows, _ = cnn_rows
    naive = {r["epochs"]: r["accuracy"] for r in rows if r["method"] == "naive"}
    for r in rows:
        if r["method"] == "fastft" and r["dtype"] == "fp32":
            assert r["accuracy"] == naive[r["epochs"]]
        elif r["method"] == "fastft":
            assert abs(r["accuracy"] - naive[r["epochs"]]) <= 0.02


def test_writes_csv_json_and_png(cnn_rows, tmp_path):
    s, rows, _ = cnn_rows
    paths = bench.write(rows, s, tmp_path)
    assert {p.name for p in paths.values()} == {"e2e.csv", "e2e.json", "e2e.png"}
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0].keys() >= {
        "task",
        "method",
        "dtype",
        "tier",
        "epochs",
        "seconds",
        "forward_passes",
        "accuracy",
        "speedup",
    }
    saved = json.loads(paths["json"].read_text())
    assert (
        saved["settings"]["epochs"] == [1, 2]
        and len(saved["rows"]) == len(rows)
        and saved["machine"]
    )
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["png"].stat().st_size > 10_000
    md = bench.table(rows)
    assert md.count("\n") == len(rows) + 1 and "| cnn | fastft | int8/disk, fp32 pass | 2 |" in md
    assert all(r["extract"] == "fp32" for r in rows)  # the suite pins extract_amp="auto" to fp32


def test_quick_settings_write_separate_files():
    s = bench.BenchSettings(quick=True)
    assert (s.max_seq_length, s.per_class_limit) == (64, 50)
    assert (
        bench.BenchSettings().max_seq_length == 128
        and bench.BenchSettings().per_class_limit is None
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0,3"], "positive integers"),
        (["--epochs", "a"], "not a comma-separated list of int"),
        (["--dtypes", "fp8"], "fp32, bf16, fp16, int8"),
        (["--tasks", "imagenet"], "bbc, cnn"),
    ],
)
def test_bad_bench_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_cli_on_the_cnn(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTFT_EXTRACT_AMP")  # 'auto' as a user's machine has it
    code = main(
        [
            "bench",
            "--tasks",
            "cnn",
            "--epochs",
            "1",
            "--dtypes",
            "fp16",
            "--tiers",
            "host",
            "--extract-amp",
            "fp32,auto",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    auto = "bf16" if native_bf16("cpu")[0] else "fp32"
    assert "| cnn | fastft | fp16/host, fp32 pass | 1 |" in out and "e2e.csv" in out
    assert f"| cnn | fastft | fp16/host, {auto} pass | 1 |" in out
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    fastft_rows = [r for r in rows if r["method"] == "fastft"]
    assert [r["extract"] for r in fastft_rows] == ["fp32", auto]
    assert all(r["accuracy"] is not None for r in fastft_rows)  # each mode's test accuracy
    assert (tmp_path / "e2e.json").is_file() and (tmp_path / "e2e.png").is_file()
