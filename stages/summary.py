"""Stage summary (last): reports/summary.json, the one DVC metrics file (the columns of `dvc exp show`).

Each column is read from the file of the stage that computed it (clipprune.report.summary.COLUMNS);
reports/summary_sources.json says, per column, which stage, file and key it came from, or why it is null
(not computed by this run: no pruned model, distillation off, no sparsity report for the largest target).
"""
from _common import run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.io import commit_together, write_json
from clipprune.report.summary import build_summary
from clipprune.sparsity.config import target_name

# every path is named once, on the stage's cmd in dvc.yaml: the evaluate stage's metrics, the distill stage's
# timing and dvclive summary, the folder of the sparsify reports, and the two files written
METRICS, DISTILL_TIMING, DISTILL_LOG, SPARSITY, OUT, SOURCES = stage_paths(
    "summary", "metrics", "distill-timing", "distill-log", "sparsity", "out", "sources", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params)
    # the report of the largest target that params.yaml names (a report left from an earlier target list is
    # not this run's); no sparsity section: no sparsity columns
    sparsity = SPARSITY / f"{target_name(max(p.sparsity.targets))}.json" if p.sparsity is not None else None
    summary, sources = build_summary({"metrics": METRICS, "distill_timing": DISTILL_TIMING,
                                      "distill_log": DISTILL_LOG, "sparsity": sparsity})
    with commit_together():  # both or neither
        write_json(OUT, {"summary": summary})
        write_json(SOURCES, sources)
    nulls = [name for name, value in summary.items() if value is None]
    print(f"summary: {len(summary) - len(nulls)} of {len(summary)} columns in {OUT}"
          + (f"; not computed by this run: {', '.join(nulls)}" if nulls else "") + f"; sources in {SOURCES}")


if __name__ == "__main__":
    run_stage("summary", main)
