"""Shared test set-up: a private cache folder, and the reliability report.

Tests marked ``@pytest.mark.reliability("fault or input tried", "what must happen")`` are
collected into a table (fault, expectation, result). With ``FASTFT_UPDATE_README=1`` the
table replaces the README's "Reliability" section, so that section is always generated from
a real test run, never written by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_reliability: list[tuple[str, str, str, str]] = []


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    # Tests never touch the user's ~/.cache/fastft.
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastft-cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(fault, expectation): a row of the README's reliability table")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    fault, expectation = (list(marker.args) + ["", ""])[:2]
    result = "passed" if report.passed else "skipped" if report.skipped else "FAILED"
    _reliability.append((fault, expectation, result, item.nodeid.split("::", 1)[-1]))


def pytest_sessionfinish(session, exitstatus):
    if not _reliability or os.environ.get("FASTFT_UPDATE_README") != "1":
        return
    lines = ["| fault or input tried | what must happen | result | test |", "|---|---|---|---|"]
    for fault, expectation, result, test in sorted(set(_reliability)):
        lines.append(f"| {fault} | {expectation} | {result} | `{test}` |")
    table = "\n".join(lines)
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"(<!-- reliability:start -->\n).*?(<!-- reliability:end -->)", re.S)
    if pattern.search(text):
        readme.write_text(pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))
