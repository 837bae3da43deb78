"""scripts/sweep.py without DVC: the grid arguments and the comparison table (fast)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"
spec = importlib.util.spec_from_file_location("sweep_script", SCRIPT)
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def test_grid_args_one_axis_per_param():
    assert sweep.grid_args("0.3,0.5", "fisher,magnitude", None, ["tune.lsq=true,false"]) == [
        "-S", "search.constraint=0.3,0.5", "-S", "score.criterion=fisher,magnitude", "-S", "tune.lsq=true,false"]
    with pytest.raises(SystemExit, match="at least one axis"):
        sweep.grid_args(None, None, None, [])
    with pytest.raises(SystemExit, match="--set expects key=v1,v2"):
        sweep.grid_args(None, None, None, ["tune.lsq"])


def row(name, method, constraint, top1, **extra):
    return {"Experiment": name, "summary.method": method, "summary.constraint": str(constraint),
            "summary.mac_pct": str(100 * constraint), "summary.top1": str(top1), **extra}


def test_tidy_table_keeps_the_sweep_sorted_and_formats_cells():
    rows = [row("b", "magnitude+mac", 0.3, 10.3), row("a", "fisher+mac", 0.7, 95.54, **{"summary.latency_ratio_image": "0.51234"}),
            row("c", "fisher+mac", 0.3, 50.97), row("old", "fisher+mac", 0.5, 85.0),
            {"Experiment": "workspace", "summary.method": "-"}]
    table = sweep.tidy_table(rows, ["a", "b", "c"])
    assert table[0][:4] == ["experiment", "method", "constraint", "MAC %"]
    assert [line[0] for line in table[1:]] == ["c", "a", "b"]  # by method, then constraint; "old" not in the sweep
    assert table[2][2:6] == ["0.70", "70.0", "–", "95.54"] and table[2][8] == "0.512"
    text = sweep.format_table(table)
    assert text.splitlines()[1].startswith("|---") and len({len(line) for line in text.splitlines()}) == 1
    assert [line[0] for line in sweep.tidy_table(rows)[1:]] == ["c", "old", "a", "b"]  # every run with a summary


def test_plain_columns_prefers_summary_json_when_older_commits_collide():
    # `dvc exp show --all-commits` over a commit whose metrics.json was a metrics file names both by file
    row = {"Experiment": "a", "search.constraint": "0.3", "reports/summary.json:summary.top1": "45.9",
           "reports/metrics.json:summary.top1": "", "summary.r1_t2i": "4.1", "reports/metrics.json:dense.x": "1"}
    assert sweep.plain_columns(row) == {"Experiment": "a", "search.constraint": "0.3", "summary.top1": "45.9",
                                        "summary.r1_t2i": "4.1"}
