# `make repro` and `make test` work on a fresh machine: they create the venv and install the pins first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipprune-installed

.PHONY: venv repro test test-fast bench clean-venv sweep methods deps pareto

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

# Runs the whole DVC pipeline on params.yaml (the embedded default out of the box), then prints the dense and
# the final model side by side (scripts/answer.py) and the path of the full report.
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@$(BIN)/python scripts/answer.py

# Rewrites the code deps of every stage in dvc.yaml from the imports of its script (scripts/stage_deps.py;
# `python scripts/stage_deps.py check` lists what is missing or extra without writing).
deps: $(STAMP)
	$(BIN)/python scripts/stage_deps.py write

# The full suite, slow end-to-end tests included (what CI runs), in TEST_JOBS pytest-xdist workers that each
# take whole files, or groups of files that share one reproduced pipeline (the pipeline files first,
# tests/conftest.py), then the 15 slowest tests.
# TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n $(TEST_JOBS) --dist loadfile --durations=15

# Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

# A grid of experiments (constraints × score criteria × search methods), run from the queue, then one table
# (method, constraint, MAC %, params, top-1, R@1, latency ratio, pruning time). Override the axes, e.g.
# `make sweep CONSTRAINTS=0.4,0.6 CRITERIA=fisher SEARCHES=mac,uniform`; `scripts/sweep.py --help` for more.
CONSTRAINTS ?= 0.3,0.5,0.7
CRITERIA ?= fisher,magnitude
SEARCHES ?= mac
SWEEP_JOBS ?= 1
sweep: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/sweep.py --constraints $(CONSTRAINTS) \
		--criteria $(CRITERIA) --searches $(SEARCHES) --jobs $(SWEEP_JOBS)

# LFPR's methods table: every importance criterion at the same kept-params budget -> reports/methods.md
BUDGET ?= 0.5
methods: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/methods_table.py --budget $(BUDGET)

# The Pareto plot (kept MACs vs zero-shot top-1, a line per method, with and without distillation): queued
# experiments for Kwon, AMP, LFPR and two baselines -> reports/plots/pareto.png and pareto_grid.json.
# A smaller grid: `make pareto PARETO_METHODS=kwon,magnitude PARETO_CONSTRAINTS=0.3,0.5,0.7 PARETO_DISTILL=false`.
PARETO_METHODS ?= kwon,amp,lfpr,magnitude,fisher-uniform
PARETO_CONSTRAINTS ?= 0.3,0.4,0.5,0.6,0.7,0.8,0.9
PARETO_DISTILL ?= false,true
pareto: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/pareto.py --methods $(PARETO_METHODS) \
		--constraints $(PARETO_CONSTRAINTS) --distill $(PARETO_DISTILL) --jobs $(SWEEP_JOBS)

clean-venv:
	rm -rf $(VENV)
