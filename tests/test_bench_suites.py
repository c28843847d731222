"""The pytest-benchmark suites in benchmarks/: collected by ``pytest benchmarks``, run by
``fastft bench --kernels/--suite``, and writing only into the results folder they are given,
never into tracked files of the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastft
from fastft.cli import main

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
CPU_SUITES = ["bench_kernels.py", "bench_cache.py", "bench_trainer.py", "bench_distributed.py"]
# One case of the kernels suite, both implementations: a few seconds.
SMALL = "test_cache_write and tokens"
ROW_FIELDS = {"case", "impl", "baseline", "median_ms", "baseline_ms", "speedup"}

pytestmark = pytest.mark.skipif(
    not (BENCHMARKS / "conftest.py").is_file(), reason="needs a source checkout (benchmarks/)"
)


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def git_status() -> str | None:
    """``git status --porcelain`` of the checkout, or None without git or a checkout."""
    if shutil.which("git") is None:
        return None
    out = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout if out.returncode == 0 else None


def needs_native():
    if not fastft.has_native():
        pytest.skip("the kernels suite is skipped without the native module: no results")


def check_kernels_results(folder: Path) -> dict:
    """The kernels suite's JSON in ``folder``, with every field render_benchmarks reads."""
    path = folder / "kernels.json"
    assert path.is_file(), sorted(p.name for p in folder.glob("*")) if folder.is_dir() else folder
    payload = json.loads(path.read_text())
    assert payload["suite"] == "kernels"
    assert payload["machine"] and payload["date"]
    assert payload["rows"], payload
    for row in payload["rows"]:
        assert ROW_FIELDS <= set(row), row
        assert "tokens" in row["case"]
        assert (row["impl"], row["baseline"]) == ("native", "reference")
        assert row["median_ms"] > 0 and row["baseline_ms"] > 0 and row["speedup"] > 0
    assert (folder / "kernels.csv").is_file()
    return payload


def test_pytest_benchmarks_collects_every_suite():
    out = run("-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(ids) > 0, out.stdout
    for suite in CPU_SUITES:
        assert any(i.startswith(f"benchmarks/{suite}::test_") for i in ids), (suite, ids)
    # The GPU suite is collected too; it skips itself when it runs without CUDA.
    assert "benchmarks/bench_gpu.py::test_gpu" in ids


def test_pytest_tests_never_collects_the_benchmarks(pytestconfig):
    if pytestconfig.inipath != ROOT / "pyproject.toml":
        pytest.skip("run with another configuration than the checkout's pyproject.toml")
    assert pytestconfig.getini("testpaths") == ["tests"]
    assert "bench_*.py" in pytestconfig.getini("python_files")
    # python_files applies everywhere: a bench_*.py under tests/ would become a test module.
    assert not list((ROOT / "tests").rglob("bench_*.py"))


def test_a_benchmark_writes_only_into_its_results_dir(tmp_path):
    needs_native()
    before = git_status()
    results = tmp_path / "results"
    out = run(
        "-m",
        "pytest",
        "benchmarks/bench_kernels.py",
        "-k",
        SMALL,
        "--benchmark-only",
        "--results-dir",
        str(results),
        "-q",
        "-p",
        "no:cacheprovider",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout, out.stdout
    payload = check_kernels_results(results)

    # The renderer takes the folder, and writes only the document it is given.
    document = tmp_path / "benchmarks.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", document)
    rendered = run("benchmarks/render_benchmarks.py", str(results), "--document", str(document))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    text = document.read_text()
    table = text[text.index("<!-- kernels:start -->") : text.index("<!-- kernels:end -->")]
    assert payload["rows"][0]["case"] in table and payload["date"] in table

    assert git_status() == before


def test_render_without_results_says_so(tmp_path):
    document = tmp_path / "benchmarks.md"
    document.write_text("<!-- kernels:start -->\nold\n<!-- kernels:end -->\n")
    missing = str(tmp_path / "none")
    out = run("benchmarks/render_benchmarks.py", missing, "--document", str(document))
    assert out.returncode == 1 and "no suite results" in out.stderr
    assert document.read_text() == "<!-- kernels:start -->\nold\n<!-- kernels:end -->\n"


def test_fastft_bench_suite_runs_into_results_dir(tmp_path):
    needs_native()
    before = git_status()
    results = tmp_path / "out"
    out = run(
        "-m",
        "fastft.cli",
        "bench",
        "--suite",
        "kernels",
        "--results-dir",
        str(results),
        "-k",
        SMALL,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"results in {results}" in out.stdout
    check_kernels_results(results)
    assert git_status() == before


def test_fastft_bench_k_needs_a_suite(capsys):
    assert main(["bench", "-k", "tokens"]) == 2
    assert "--kernels/--suite" in capsys.readouterr().err
