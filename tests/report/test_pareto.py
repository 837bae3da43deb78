"""The Pareto view's data: `dvc exp show --csv` rows -> points per method, with and without distillation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clipprune.report.pareto import dense_top1, family, pareto_points, pareto_series, plot_pareto

REPO = Path(__file__).resolve().parents[2]


def row(name, criterion, search, constraint, mac, top1, distill_s="", lsq="true"):
    return {"Experiment": name, "score.criterion": criterion, "search.method": search,
            "search.constraint": str(constraint), "tune.lsq": lsq, "tune.rearrange": lsq,
            "summary.mac_pct": str(mac), "summary.top1": str(top1), "summary.distill_time_s": distill_s,
            "summary.dense_top1": "96.7"}


ROWS = [
    {"Experiment": "", "rev": "workspace", "summary.mac_pct": "-", "summary.top1": "-"},  # not a finished run
    row("k7", "fisher", "mac", 0.7, 69.9, 95.0),
    row("k3", "fisher", "mac", 0.3, 29.8, 60.0),
    row("k3d", "fisher", "mac", 0.3, 29.8, 90.0, distill_s="41.5"),
    row("m5", "magnitude", "uniform", 0.5, 50.0, 40.0, lsq="false"),
    row("f5", "fisher", "mac", 0.5, 50.0, 80.0, lsq="false"),  # fisher+mac without tuning is not Kwon
    row("broken", "fisher", "mac", 0.4, "", ""),
]


def test_family_names_the_papers_pairs():
    assert family("fisher", "mac") == "Kwon (fisher+mac+tune)"
    assert family("fisher", "mac", tuned=False) == "fisher+mac"
    assert family("taylor_entropy", "adaptive").startswith("AMP")
    assert family("label_free", "param_sum").startswith("LFPR")
    assert family("abs_gradient", "threshold") == "abs_gradient+threshold"


def test_points_and_series_from_exp_show_rows():
    points = pareto_points(ROWS)
    assert [p["experiment"] for p in points] == ["k7", "k3", "k3d", "m5", "f5"]  # runs without figures skipped
    series = pareto_series(points)
    assert set(series) == {"Kwon (fisher+mac+tune)", "Kwon (fisher+mac+tune), distilled", "magnitude+uniform",
                           "fisher+mac"}
    kwon = series["Kwon (fisher+mac+tune)"]
    assert [(p["mac_pct"], p["top1"]) for p in kwon] == [(29.8, 60.0), (69.9, 95.0)]  # sorted by kept MACs
    assert [p["top1"] for p in series["Kwon (fisher+mac+tune), distilled"]] == [90.0]
    assert dense_top1(ROWS) == pytest.approx(96.7)
    # a rerun of the same point keeps the last
    again = pareto_series(points + pareto_points([row("k3b", "fisher", "mac", 0.3, 29.8, 61.0)]))
    assert [p["experiment"] for p in again["Kwon (fisher+mac+tune)"]] == ["k3b", "k7"]


def test_plot_pareto_draws_every_series(tmp_path):
    drawn = plot_pareto(pareto_points(ROWS), tmp_path / "pareto.png", dense=96.7, dpi=30)
    assert len(drawn) == 4 and (tmp_path / "pareto.png").stat().st_size > 1000


def test_pareto_grid_arguments():
    sys.path.insert(0, str(REPO / "scripts"))
    import pareto

    args = pareto.grid("kwon", "0.3,0.5", "0.01", "false,true")
    assert "search.constraint=0.3,0.5" in args and "distill.enabled=false,true" in args
    assert "tune.lsq=true" in args and args[::2] == ["-S"] * (len(args) // 2)
    amp = pareto.grid("amp", "0.3,0.5", "0.01,0.02", "false")
    assert "search.loss_inc_thresh=0.01,0.02" in amp and not any(a.startswith("search.constraint") for a in amp)
    with pytest.raises(SystemExit, match="--methods must be among"):
        pareto.main(["--methods", "kwon,nope", "--show"])
