"""`scripts/sweep.py`: a 2-experiment grid queued and run by DVC, then the comparison table, `dvc exp show`
columns and `dvc plots diff` overlaying both experiments (slow).

The grid runs on the session's reproduced embedded default (``default_pipeline`` in tests/conftest.py,
shared with test_pipeline_e2e.py): the experiments start from its commit and take every stage before
`search` from DVC's run cache, as a user's sweep after a `dvc repro` does.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline_utils import dvc, env, git

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(default_pipeline):
    repo = default_pipeline
    status = git(repo, "status", "--porcelain")
    # distillation and the per-step evaluations off: what is under test is the grid, the table and the plots
    command = [sys.executable, "scripts/sweep.py", "--constraints", "0.4,0.6", "--criteria", "fisher",
               "--set", "distill.enabled=false", "--set", "evaluate.steps=false", "--target", "report",
               "--target", "summary",
               "--csv", str(repo.parent / "sweep.csv")]
    proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env(), timeout=1800)
    assert git(repo, "status", "--porcelain") == status  # experiments ran in temporary copies
    return repo, proc


def test_sweep_runs_the_grid_and_prints_the_table(swept):
    repo, proc = swept
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what the grid does not change comes from the run cache of the session's `dvc repro`
    for stage in ("download", "calibrate", "score", "evaluate_dense"):
        assert f"Running stage '{stage}'" not in proc.stdout, stage
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "fisher+mac" in line]
    assert len(table) == 2, proc.stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert [r[2] for r in rows] == ["0.40", "0.60"]  # constraint column, sorted
    for row, constraint in zip(rows, (40, 60)):
        assert abs(float(row[3]) - constraint) < 1.0  # MAC % within the budget's rounding
        assert 0 < float(row[5]) <= 100  # top-1 %
    csv_lines = (repo.parent / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment,method,constraint,MAC %") and len(csv_lines) == 3


def test_exp_show_and_plots_diff_compare_the_experiments(swept):
    repo, proc = swept
    names = [line.split("|")[1].strip() for line in proc.stdout.splitlines()
             if line.startswith("| ") and "fisher+mac" in line]
    plots = json.loads(dvc(repo, "plots", "diff", *names, "--json").stdout)["data"]
    points = plots["accuracy_vs_mac"][0]["content"]["data"]["values"]  # a vega-lite spec, one point per run
    assert sorted(p["rev"] for p in points) == sorted(names)
    assert {round(p["kept_mac_pct"]) for p in points} == {40, 60}
    assert {"reports/plots/kept_units.png", "kept_neurons_per_layer"} <= set(plots)
