# `make repro` and `make test` work on a fresh machine: they create the venv and install the pins first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipprune-installed

.PHONY: venv repro test test-fast bench clean-venv

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

# Runs the whole DVC pipeline on params.yaml (the embedded default out of the box).
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@echo "metrics: reports/metrics.json"
	@PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc metrics show

# The full suite, slow end-to-end tests included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

# Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean-venv:
	rm -rf $(VENV)
