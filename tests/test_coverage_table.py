"""tools/coverage_table.py: docs/coverage.md's per-module figures from a coverage JSON report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "coverage_table.py"
pytestmark = pytest.mark.skipif(not TOOL.is_file(), reason="needs a source checkout (tools/)")


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("coverage_table", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(lines, n_lines, branches, n_branches) -> dict:
    return {
        "covered_lines": lines,
        "num_statements": n_lines,
        "covered_branches": branches,
        "num_branches": n_branches,
    }


REPORT = {
    "meta": {"branch_coverage": True},
    "files": {
        "fastft/b.py": {"summary": summary(3, 4, 1, 4)},
        "fastft/a.py": {"summary": summary(10, 10, 0, 0)},
    },
    "totals": summary(13, 14, 1, 4),
}


def test_rows_give_lines_and_branches_apart(table):
    text = table.render(REPORT)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [  # sorted by path; a module without branches shows a dash
        "| `fastft/a.py` | 10/10 | 100.0% | 0/0 | – | 100.0% |",
        "| `fastft/b.py` | 3/4 | 75.0% | 1/4 | 25.0% | 50.0% |",
    ]
    assert "lines 92.9% (13/14), branches 25.0% (1/4), combined 77.8%" in text


def test_the_floor_is_read_from_pyproject(table):
    import coverage

    floor = coverage.Coverage(config_file=str(TOOL.parent.parent / "pyproject.toml")).get_option(
        "report:fail_under"
    )
    assert f"floor ({floor:g}%" in table.render(REPORT)


def test_a_report_without_branches_is_refused(table):
    with pytest.raises(SystemExit, match="no branch data"):
        table.render({**REPORT, "meta": {"branch_coverage": False}})


def test_main_writes_the_table_and_reports_a_missing_report(table, tmp_path):
    source, target = tmp_path / "coverage.json", tmp_path / "coverage.md"
    assert table.main([str(source), str(target)]) == 1 and not target.exists()
    source.write_text(json.dumps(REPORT))
    assert table.main([str(source), str(target)]) == 0
    assert target.read_text() == table.render(REPORT)
