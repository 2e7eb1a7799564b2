# Two commands do everything: `make demo` (the local failover lab) and `make test`.
# Each sets up its own virtualenv in .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`. The chaos matrix is bound by sleeps (60 s replica
# timeouts on stock settings), not CPU: 6 workers fit 2 cores. --maxschedchunk 1 hands
# out one test at a time, so the long cells (collected first) spread over the workers.
# `python -m pytest` puts the checkout on sys.path for -p tests.support.report (the
# matrix's measured times at the end of the run).
JOBS ?= 6

.PHONY: demo test lint typecheck docs unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/watchdogd demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check watchdogd tests bench
	$(BIN)/ruff format --check watchdogd tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The manual (docs/, mkdocs.yml) into build/site; strict: a broken link fails it.
# Not --quiet: in mkdocs 1.6 it hides the warnings that --strict counts, so nothing fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint typecheck docs
	$(BIN)/python -m pytest -p tests.support.report -ra -n $(JOBS) --maxschedchunk 1 $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/idle.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
