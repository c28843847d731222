# Two commands do all set-up on a fresh machine:
#   make test   — .venv, torch (only if none is importable), fastft with its extras, all tests
#   make demo   — the same set-up, then `fastft demo`
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Keep a GPU machine's own torch: the venv sees the system site-packages, and torch is
# installed (the CPU build pinned here) only when none is importable.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup test demo bench docs lint clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,demo]"
	@$(PY) -c "import fastft, json; print('fastft', fastft.__version__, json.dumps(fastft.build_info()))"

# Branch coverage of fastft/ (subprocesses included), its report in the terminal and in
# build/coverage.json; the run fails below fail_under of [tool.coverage.report] in
# pyproject.toml (lines and branches together, CUDA-only code left out).
COV := --cov=fastft --cov-branch --cov-report=term-missing:skip-covered --cov-report=json
test: setup
	$(PY) -m pytest tests $(COV)

demo: setup
	$(VENV)/bin/fastft demo

# The reliability table and the coverage table, from a run of the whole suite (never written
# by an ordinary test run).
docs: setup
	FASTFT_RELIABILITY_REPORT=docs/reliability.md $(PY) -m pytest tests -q $(COV)
	$(PY) tools/coverage_table.py build/coverage.json docs/coverage.md

# ruff: lint rules and formatting as configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The pytest-benchmark suites into $(BENCH_RESULTS) (git-ignored), then their tables copied
# into docs/benchmarks.md. Committed figures change only with BENCH_RESULTS=benchmarks/results.
BENCH_RESULTS ?= .benchmarks/results
bench: setup
	$(VENV)/bin/fastft bench --kernels --results-dir $(BENCH_RESULTS)
	$(PY) benchmarks/render_benchmarks.py $(BENCH_RESULTS)

clean:
	rm -rf build $(VENV) .pytest_cache .benchmarks
