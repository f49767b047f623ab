# `make demo` and `make test` build .venv when it is missing (or pyproject.toml changed).
# demo: several replicas of the example service boot at once on an embedded database.
# test: lint, types and the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-faults bench lint types pytest demo clean

test: lint types pytest

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Benchmarks print tables (docs/performance.md explains them); not part of `make test`.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples migrations benchmarks
	$(BIN)/ruff format --check src tests examples migrations benchmarks

types: $(STAMP)
	$(BIN)/mypy

# Three workers on two cores: most of the suite waits on leases, servers and processes.
pytest: $(STAMP)
	$(BIN)/pytest -n 3

# The fault suite at full scale (CI runs it reduced, within `make test`): 20 storms of 32
# processes, repeated kills, pauses and restarts, 300 property examples per driver.
test-faults: $(STAMP)
	BOOTMIGRATE_FAULTS=full BOOTMIGRATE_FAULTS_REPORT=faults-report.json \
	  $(BIN)/pytest tests/faults --timeout 1800

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
