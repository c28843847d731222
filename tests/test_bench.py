"""``fastft bench``: the end-to-end naive-vs-fastft benchmark, on the CPU CNN task (seconds)."""

from __future__ import annotations

import csv
import json

import pytest

from fastft.bench import e2e as bench
from fastft.cli import main


@pytest.fixture(scope="module")
def cnn_rows():
    s = bench.BenchSettings(
        tasks=("cnn",),
        epochs=(1, 2),
        dtypes=("fp32", "int8"),
        tiers=("host", "disk"),
        verbose=False,
    )
    return s, bench.run(s, log=lambda msg: None)


def test_one_row_per_method_dtype_tier_and_epoch_count(cnn_rows):
    s, rows = cnn_rows
    keys = [(r["method"], r["dtype"], r["tier"], r["epochs"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 + 2 * 2 * 2
    assert {k for k in keys if k[0] == "naive"} == {
        ("naive", "fp32", "-", 1),
        ("naive", "fp32", "-", 2),
    }


def test_forward_passes_and_speedup_are_from_the_same_run(cnn_rows):
    _, rows = cnn_rows
    naive = {r["epochs"]: r for r in rows if r["method"] == "naive"}
    n = naive[1]["forward_passes"]
    assert naive[2]["forward_passes"] == 2 * n  # the frozen convs ran again in epoch 2
    for r in rows:
        if r["method"] == "fastft":
            assert r["forward_passes"] == n  # once per sample, whatever the epochs
            assert r["seconds"] > r["build_seconds"] > 0
            assert r["speedup"] == pytest.approx(naive[r["epochs"]]["seconds"] / r["seconds"])


def test_fp32_cache_trains_the_same_head_as_the_naive_loop(cnn_rows):
    # Same seeded head, same batch order, fp32 features: the oracle says the same weights,
    # hence the same test accuracy; int8 stays close.
    _, rows = cnn_rows
    naive = {r["epochs"]: r["accuracy"] for r in rows if r["method"] == "naive"}
    for r in rows:
        if r["method"] == "fastft" and r["dtype"] == "fp32":
            assert r["accuracy"] == naive[r["epochs"]]
        elif r["method"] == "fastft":
            assert abs(r["accuracy"] - naive[r["epochs"]]) <= 0.02


def test_writes_csv_json_and_png(cnn_rows, tmp_path):
    s, rows = cnn_rows
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
    assert md.count("\n") == len(rows) + 1 and "| cnn | fastft | int8/disk | 2 |" in md


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


def test_bench_cli_on_the_cnn(tmp_path, capsys):
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
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| cnn | fastft | fp16/host | 1 |" in out and "e2e.csv" in out
    assert (tmp_path / "e2e.json").is_file() and (tmp_path / "e2e.png").is_file()
