"""The Pareto plot: Kwon, AMP, LFPR and two baselines over a range of budgets, with and without
distillation, as queued DVC experiments, drawn into reports/plots/pareto.png.

    python scripts/pareto.py                                   # the full grid (5 methods x 7 budgets x 2)
    python scripts/pareto.py --methods kwon,magnitude --constraints 0.3,0.5,0.7 --distill false
    python scripts/pareto.py --show                            # only redraw from the finished experiments

Each method is one `dvc exp run --queue` grid (its params, `search.constraint` x `distill.enabled`; AMP
ignores the constraint and takes its natural points from `search.loss_inc_thresh` instead), run with
`dvc exp run --run-all` in temporary copies (the workspace is untouched). The points are read back from
`dvc exp show --csv` (params and summary.json's columns) and written to reports/plots/pareto_grid.json (the
data of the `pareto` plot in dvc.yaml: `dvc plots show`) and reports/plots/pareto.png (one line per method;
dashed without distillation, solid with). Run from the repository root with the venv's dvc on PATH
(`make pareto` does both).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import exp_rows, format_table, queue_grid, run_queue  # noqa: E402  (the sweep's DVC plumbing)

from clipprune.io import write_json  # noqa: E402
from clipprune.report.pareto import dense_top1, pareto_points, pareto_series, plot_pareto  # noqa: E402

NO_TUNE = ["tune.rearrange=false", "tune.lsq=false"]
# method -> the -S settings that select it (the paper's pairing of score and search)
METHODS = {
    "kwon": ["score.criterion=fisher", "score.loss=contrastive", "search.method=mac", "search.metric=mac",
             "tune.rearrange=true", "tune.lsq=true"],
    "amp": ["score.criterion=taylor_entropy", "score.loss=entropy", "score.granularity=sample",
            "search.method=adaptive", *NO_TUNE],
    "lfpr": ["score.criterion=label_free", "search.method=param_sum", "search.metric=params", *NO_TUNE],
    "magnitude": ["score.criterion=magnitude", "search.method=uniform", "search.metric=mac", *NO_TUNE],
    "fisher-uniform": ["score.criterion=fisher", "score.loss=contrastive", "search.method=uniform",
                       "search.metric=mac", *NO_TUNE],
}
COMMON = ["evaluate.steps=false"]  # the per-step evaluations are not points of this plot
CONSTRAINTS = "0.3,0.4,0.5,0.6,0.7,0.8,0.9"
AMP_THRESHOLDS = "0.005,0.01,0.02,0.05,0.1"  # AMP's natural points: the accepted held-out loss rise per block
OUT_PNG = Path("reports/plots/pareto.png")
OUT_JSON = Path("reports/plots/pareto_grid.json")


def grid(method: str, constraints: str, thresholds: str, distill: str) -> list[str]:
    """The -S arguments of one method's grid (DVC expands the comma lists into their cross product)."""
    budget = f"search.loss_inc_thresh={thresholds}" if method == "amp" else f"search.constraint={constraints}"
    settings = [*COMMON, *METHODS[method], budget, f"distill.enabled={distill}"]
    return [arg for item in settings for arg in ("-S", item)]


def table(points: list[dict]) -> list[list[str]]:
    rows = [["method", "distilled", "constraint", "MAC %", "top-1 %", "experiment"]]
    for label, line in pareto_series(points).items():
        for p in line:
            rows.append([p["method"], "yes" if p["distilled"] else "no",
                         "–" if p["constraint"] is None else f"{p['constraint']:.2f}", f"{p['mac_pct']:.1f}",
                         f"{p['top1']:.2f}", p["experiment"]])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--constraints", default=CONSTRAINTS, help="search.constraint values (all but AMP)")
    parser.add_argument("--amp-thresholds", default=AMP_THRESHOLDS, help="AMP's search.loss_inc_thresh values")
    parser.add_argument("--distill", default="false,true", help="distill.enabled values: false,true | false | true")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)")
    parser.add_argument("--show", action="store_true", help="only redraw from the finished experiments")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"pareto: error: --methods must be among {', '.join(METHODS)}, got {', '.join(unknown)}")

    names = None
    if not args.show:
        names = []
        for method in methods:
            names += queue_grid(grid(method, args.constraints, args.amp_thresholds, args.distill), ["summary"])
        print(f"pareto: queued {len(names)} experiments")
        run_queue(args.jobs)
    rows = exp_rows(all_commits=True)  # a grid queued before the last commit is an experiment of the one before
    chosen = [r for r in rows if names is None or r.get("Experiment") in names]
    points = pareto_points(chosen)
    write_json(OUT_JSON, points)
    plot_pareto(points, OUT_PNG, dense=dense_top1(rows), dpi=args.dpi)
    print(format_table(table(points)))
    print(f"pareto: {len(points)} points in {OUT_JSON}, plot {OUT_PNG}")
    if names is not None and len(points) < len(names):
        print(f"pareto: error: {len(names) - len(points)} experiment(s) gave no point (see `dvc queue logs`)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
