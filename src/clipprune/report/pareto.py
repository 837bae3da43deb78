"""The Pareto view across runs: kept MACs vs zero-shot top-1, one line per method (with and without
distillation), from the rows of `dvc exp show --csv` (params and the ``summary.*`` columns)."""
from __future__ import annotations

from pathlib import Path

# (score.criterion, search.method) -> the method's name in the plot; other pairs are named "<criterion>+<search>"
FAMILIES = {
    ("fisher", "mac"): "Kwon (fisher+mac+tune)",
    ("taylor_entropy", "adaptive"): "AMP (taylor_entropy+adaptive)",
    ("label_free", "param_sum"): "LFPR (label_free+param_sum)",
    ("magnitude", "uniform"): "magnitude+uniform",
    ("fisher", "uniform"): "fisher+uniform",
}


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN: not computed


def _flag(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def family(criterion: str, search: str, tuned: bool = True) -> str:
    """The method's name: Kwon et al. only with mask tuning on; otherwise ``<criterion>+<search>``."""
    name = FAMILIES.get((criterion, search))
    if name is None or (name.startswith("Kwon") and not tuned):
        return f"{criterion}+{search}"
    return name


def pareto_points(rows: list[dict]) -> list[dict]:
    """One point per finished run: ``method``, ``distilled``, ``constraint``, ``mac_pct``, ``top1``,
    ``experiment``. Rows without both kept MACs and top-1 (failed runs, dense-only runs) are skipped."""
    points = []
    for row in rows:
        mac, top1 = _number(row.get("summary.mac_pct")), _number(row.get("summary.top1"))
        if mac is None or top1 is None:
            continue
        tuned = _flag(row.get("tune.lsq", "true")) or _flag(row.get("tune.rearrange", "true"))
        points.append({
            "experiment": row.get("Experiment") or row.get("rev", ""),
            "method": family(row.get("score.criterion", "?"), row.get("search.method", "?"), tuned),
            "distilled": _number(row.get("summary.distill_time_s")) is not None,
            "constraint": _number(row.get("search.constraint")),
            "mac_pct": mac,
            "top1": top1,
        })
    return points


def dense_top1(rows: list[dict]) -> float | None:
    """The dense model's top-1 (the same in every run of one model and data; the first found)."""
    return next((value for value in (_number(r.get("summary.dense_top1")) for r in rows) if value is not None), None)


def pareto_series(points: list[dict]) -> dict[str, list[dict]]:
    """``{"<method>" or "<method>, distilled": points sorted by kept MACs}``; a repeated run of the same
    method, distillation and constraint keeps its last point."""
    series: dict[str, dict] = {}
    for point in points:
        label = point["method"] + (", distilled" if point["distilled"] else "")
        key = (point["constraint"], round(point["mac_pct"], 6))
        series.setdefault(label, {})[key] = point
    return {label: sorted(by_key.values(), key=lambda p: p["mac_pct"]) for label, by_key in sorted(series.items())}


def plot_pareto(points: list[dict], path: str | Path, dense: float | None = None, dpi: int = 100,
                title: str = "zero-shot top-1 vs kept MACs") -> dict[str, list[dict]]:
    """reports/plots/pareto.png: a line per method (dashed: without distillation, solid: with), the dense
    model as a star at 100 %; returns the series drawn."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    series = pareto_series(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for label, line in series.items():
        method = label.removesuffix(", distilled")
        color = colors.setdefault(method, f"C{len(colors) % 10}")
        distilled = label.endswith(", distilled")
        ax.plot([p["mac_pct"] for p in line], [p["top1"] for p in line], "-o" if distilled else "--s",
                color=color, ms=4, label=label)
    if dense is not None:
        ax.plot([100.0], [dense], "k*", ms=12, label=f"dense: {dense:.1f}")
    ax.set_xlabel("kept prunable MACs of the pruned towers (%)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_xlim(0, 105)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, Path(path), dpi)
    return series
