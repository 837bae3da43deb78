"""LFPR's methods table for this project: each importance criterion at the same kept-params budget.

    python scripts/methods_table.py                  # queue, run, then write reports/methods.md
    python scripts/methods_table.py --budget 0.4     # another kept-params fraction
    python scripts/methods_table.py --show           # only rebuild reports/methods.md from finished runs

One DVC experiment per criterion (named ``methods-<criterion>``), queued with `dvc exp run --queue` and run
with `dvc exp run --run-all` in temporary copies (the workspace is untouched). Every run uses the same
search (`param_sum`, LFPR's "sum" search, `search.metric: params`) at the same `search.constraint`, with
mask tuning and distillation off, so the criterion is the only difference. The table is read back from
`dvc exp show --csv` (the `summary` block of reports/summary.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import exp_rows, format_table, run_queue  # noqa: E402  (the sweep's own DVC plumbing)

# criterion -> (row label, the -S overrides that select it); `+` adds a key params.yaml does not have
METHODS = {
    "magnitude": ("magnitude (L1 of the unit's weights)", ["score.criterion=magnitude", "+score.options.norm=l1"]),
    "abs_gradient": ("absolute gradient (contrastive loss)", ["score.criterion=abs_gradient",
                                                              "score.loss=contrastive"]),
    "fisher": ("Fisher, with captions (contrastive loss)", ["score.criterion=fisher", "score.loss=contrastive"]),
    "label_free": ("label-free (max image-text logit)", ["score.criterion=label_free"]),
    "taylor_entropy": ("Taylor-entropy (AMP, MLP neurons only)", ["score.criterion=taylor_entropy",
                                                                  "score.loss=entropy",
                                                                  "score.granularity=sample"]),
}
COMMON = ["search.method=param_sum", "search.metric=params", "tune.rearrange=false", "tune.lsq=false",
          "distill.enabled=false", "score.granularity=batch"]
COLUMNS = (  # (title, dvc exp show column, format)
    ("kept params M", "summary.params_m", "{:.3f}"),
    ("kept params %", "summary.params_pct", "{:.1f}"),
    ("kept MACs %", "summary.mac_pct", "{:.1f}"),
    ("top-1 %", "summary.top1", "{:.1f}"),
    ("R@1 t→i %", "summary.r1_t2i", "{:.1f}"),
    ("R@1 i→t %", "summary.r1_i2t", "{:.1f}"),
    ("pruning s", "summary.pruning_time_s", "{:.1f}"),
    ("file MB", "summary.file_mb", "{:.2f}"),
)
OUT = Path("reports/methods.md")


def experiment_name(criterion: str, budget: float) -> str:
    return f"methods-{criterion.replace('_', '-')}-{int(round(budget * 100))}"


def overrides(criterion: str, budget: float) -> list[str]:
    """The -S values of one run: the common settings, then the criterion's own (which win)."""
    _, own = METHODS[criterion]
    settings = [*COMMON, f"search.constraint={budget}"]
    own_keys = {item.lstrip("+").split("=", 1)[0] for item in own}
    return [s for s in settings if s.split("=", 1)[0] not in own_keys] + own


def queue(criteria: list[str], budget: float) -> None:
    from sweep import _dvc

    for criterion in criteria:
        args = [arg for item in overrides(criterion, budget) for arg in ("-S", item)]
        proc = _dvc("exp", "run", "--queue", "-n", experiment_name(criterion, budget), *args, "summary")
        if proc.returncode != 0:
            raise SystemExit(f"methods_table: error: queueing {criterion} failed: {proc.stderr.strip()}")
        print(f"methods_table: queued {experiment_name(criterion, budget)}")


def cell(row: dict, column: str, fmt: str) -> str:
    value = row.get(column, "")
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return "–"


def markdown(rows: list[dict], criteria: list[str], budget: float) -> tuple[str, list[str]]:
    """The table of reports/methods.md and the criteria whose run is missing."""
    by_name = {row.get("Experiment"): row for row in rows}
    table = [["criterion", *(title for title, _, _ in COLUMNS)]]
    missing = []
    for criterion in criteria:
        row = by_name.get(experiment_name(criterion, budget))
        if row is None:
            missing.append(criterion)
            continue
        table.append([METHODS[criterion][0], *(cell(row, col, fmt) for _, col, fmt in COLUMNS)])
    dense = next((r for r in rows if r.get("summary.dense_top1") not in (None, "", "-")), None)
    lines = [
        "# Methods at the same kept-params budget (embedded default)",
        "",
        f"Every run: `search.method: param_sum`, `search.metric: params`, `search.constraint: {budget}` of the "
        "prunable vision-tower params, no mask tuning, no distillation; only `score.criterion` differs. "
        "Produced by `python scripts/methods_table.py` (`make methods`); wall times are of score + search + "
        "tune on the machine that ran it.",
        "",
        format_table(table),
    ]
    if dense is not None:
        lines += ["", f"Dense zero-shot top-1: {cell(dense, 'summary.dense_top1', '{:.1f}')} %."]
    return "\n".join(lines) + "\n", missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5, help="kept fraction of the prunable params")
    parser.add_argument("--criteria", default=",".join(METHODS), help="comma separated subset of the criteria")
    parser.add_argument("--show", action="store_true", help="only write the table from finished runs")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    criteria = [c for c in args.criteria.split(",") if c]
    unknown = sorted(set(criteria) - set(METHODS))
    if unknown:
        parser.error(f"--criteria: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if not args.show:
        queue(criteria, args.budget)
        run_queue(args.jobs)
    text, missing = markdown(exp_rows(), criteria, args.budget)
    from clipprune.io import atomic_path

    with atomic_path(OUT) as tmp:
        tmp.write_text(text)
    print(text)
    if missing:
        print(f"methods_table: error: no finished run for {', '.join(missing)} (see `dvc queue logs <name>`)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
