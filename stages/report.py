"""Stage report: reports/summary.md and the figures under reports/plots/ from the metrics and the masks."""
from _common import run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.models.masks import load_masks
from clipprune.report import ReportPaths, load_metrics, load_search_trace, write_report

# every path is named once, on the stage's cmd in dvc.yaml; the kept units are drawn from the tuned masks, or
# the searched ones when tune did not run; summary.md and plots/ go into the out folder
METRICS, TUNED, SEARCHED, TRACE, OUT = stage_paths("report", "metrics", "tuned", "searched", "trace", "out",
                                                   main=__name__ == "__main__")
MASKS = (TUNED, SEARCHED)  # the first found


def main(params: dict) -> None:
    dpi = parse_params(params).report.dpi  # the section is optional: its defaults
    metrics = load_metrics(METRICS)
    mask_file = next((path for path in MASKS if path.is_file()), None) if "pruned" in metrics else None
    masks = load_masks(mask_file) if mask_file is not None else None
    paths = ReportPaths(OUT)
    drawn = write_report(metrics, masks, load_search_trace(TRACE), paths, dpi=dpi)
    point = drawn["pareto"]
    print(f"report: {point.get('method')} at {point['kept_mac_pct']:.1f} % of the MACs, top-1 "
          f"{point.get('top1', float('nan')):.1f} %; wrote {paths.summary} and {paths.pareto.parent}/")


if __name__ == "__main__":
    run_stage("report", main)
