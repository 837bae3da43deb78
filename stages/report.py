"""Stage report: reports/summary.md and the figures under reports/plots/ from the metrics and the masks."""
from pathlib import Path

from _common import run_stage
from clipprune.config import parse_params
from clipprune.models.masks import load_masks
from clipprune.report import ReportPaths, load_metrics, write_report

METRICS = Path("reports/metrics.json")
MASKS = (Path("artifacts/masks/tuned.safetensors"), Path("artifacts/masks/search.safetensors"))  # first found


def main(params: dict) -> None:
    dpi = parse_params(params).report.dpi  # the section is optional: its defaults
    metrics = load_metrics(METRICS)
    mask_file = next((path for path in MASKS if path.is_file()), None) if "pruned" in metrics else None
    masks = load_masks(mask_file) if mask_file is not None else None
    paths = ReportPaths("reports")
    drawn = write_report(metrics, masks, paths, dpi=dpi)
    point = drawn["pareto"]
    print(f"report: {point.get('method')} at {point['kept_mac_pct']:.1f} % of the MACs, top-1 "
          f"{point.get('top1', float('nan')):.1f} %; wrote {paths.summary} and {paths.pareto.parent}/")


if __name__ == "__main__":
    run_stage("report", main)
