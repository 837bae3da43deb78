"""The report stage's library: summary.md, the per-run Pareto point and kept-units data, PNG figures."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_path, commit_together, write_json
from .plots import heatmap_matrices, plot_accuracy_vs_mac, plot_kept_units, plot_search_trace
from .tables import (kept_units, kept_units_rows, load_metrics, load_search_trace, neuron_bins, pareto_point,
                     summary_markdown)

__all__ = ["ReportPaths", "heatmap_matrices", "kept_units", "kept_units_rows", "load_metrics", "load_search_trace", "neuron_bins",
           "pareto_point", "plot_accuracy_vs_mac", "plot_kept_units", "plot_search_trace", "summary_markdown", "write_report"]


class ReportPaths:
    """Where the report's files go under ``reports_dir`` (the DVC outs of the report stage)."""

    def __init__(self, reports_dir: str | Path):
        root = Path(reports_dir)
        self.summary = root / "summary.md"
        self.pareto = root / "plots" / "pareto.json"
        self.kept_units = root / "plots" / "kept_units.json"
        self.kept_units_png = root / "plots" / "kept_units.png"
        self.accuracy_png = root / "plots" / "accuracy_vs_mac.png"
        self.search_trace_png = root / "plots" / "search_trace.png"

    def all(self) -> list[Path]:
        return [self.summary, self.pareto, self.kept_units, self.kept_units_png, self.accuracy_png,
                self.search_trace_png]


def write_report(metrics: dict, masks: dict | None, trace: dict, paths: ReportPaths, dpi: int = 100) -> dict:
    """Write every report file (together: all or none); returns what was drawn (``pareto``, ``kept``, ``heatmap``, ``points``).

    ``masks`` are the final head/neuron masks (tuned scales or 0/1); ``None`` (no pruned model) leaves the
    kept-units table empty and the heatmap a placeholder. ``trace`` is the search's trace (``search_trace.json``:
    per-block candidates of the adaptive search; other searches write one without ``layers``).
    """
    kept = kept_units(masks) if masks else {}
    point = pareto_point(metrics)
    with commit_together():  # every file, or none
        write_json(paths.pareto, [point])
        write_json(paths.kept_units, kept_units_rows(kept))
        heatmap = plot_kept_units(kept, paths.kept_units_png, dpi=dpi)
        points = plot_accuracy_vs_mac(metrics, paths.accuracy_png, dpi=dpi)
        plot_search_trace(trace, paths.search_trace_png, dpi=dpi)
        with atomic_path(paths.summary) as tmp:
            tmp.write_text(summary_markdown(metrics, kept))
    return {"pareto": point, "kept": kept, "heatmap": heatmap, "points": points}
