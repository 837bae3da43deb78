"""The report's data: kept units per layer from masks, the Pareto point of a run, and summary.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..errors import DataError
from ..models.masks import parse_mask_key

NEURON_BINS = 24  # columns of the neuron heatmap: kept share of each run of ffn_dim / NEURON_BINS neurons


def load_metrics(path: str | Path) -> dict:
    """The evaluate stage's ``reports/metrics.json``; DataError if missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found (run the evaluate stage first)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(metrics, dict) or "dense" not in metrics:
        raise DataError(f"{path}: expected an object with a 'dense' entry (evaluate stage output)")
    return metrics


def load_search_trace(path: str | Path) -> dict:
    """The search stage's trace (``search_trace.json``); DataError if missing, not JSON, or not a trace."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: search trace not found (run the search stage first)")
    try:
        trace = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("method"), str) \
            or not isinstance(trace.get("layers", []), list):
        raise DataError(f"{path}: expected an object with 'method' and a 'layers' list (search stage output)")
    return trace


def kept_units(masks: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Per tower: ``heads`` (bool ``[layers, heads]``), ``neurons`` (bool ``[layers, ffn_dim]``), kept counts.

    A unit is kept when its mask value (a tuned scale or a 0/1 mask) is non-zero. A tower whose masks
    lack one kind keeps all units of that kind (an all-True matrix of the other kind's layer count).
    """
    towers: dict[str, dict] = {}
    for key, mask in masks.items():
        tower, kind = parse_mask_key(key)
        towers.setdefault(tower, {})[kind] = mask.detach().cpu() != 0
    out = {}
    for tower in sorted(towers):
        kinds = towers[tower]
        heads, neurons = kinds.get("head"), kinds.get("neuron")
        layers = (heads if heads is not None else neurons).shape[0]
        heads = heads if heads is not None else torch.ones(layers, 1, dtype=torch.bool)
        neurons = neurons if neurons is not None else torch.ones(layers, 1, dtype=torch.bool)
        out[tower] = {
            "heads": heads,
            "neurons": neurons,
            "kept_heads": heads.sum(dim=1).tolist(),
            "kept_neurons": neurons.sum(dim=1).tolist(),
            "total_heads": heads.shape[1],
            "total_neurons": neurons.shape[1],
        }
    return out


def neuron_bins(neurons: torch.Tensor, bins: int = NEURON_BINS) -> torch.Tensor:
    """Kept share of each of ``bins`` equal runs of the neuron index, per layer: ``[layers, bins]``."""
    layers, width = neurons.shape
    bins = max(1, min(bins, width))
    edges = torch.linspace(0, width, bins + 1).round().long()
    return torch.stack([neurons[:, int(lo):int(hi)].float().mean(dim=1) for lo, hi in zip(edges[:-1], edges[1:])],
                       dim=1)


def kept_units_rows(kept: dict[str, dict]) -> list[dict]:
    """One row per (tower, layer) for the DVC plot ``kept_units.json`` (percentages 0-100)."""
    rows = []
    for tower, info in kept.items():
        for layer, (heads, neurons) in enumerate(zip(info["kept_heads"], info["kept_neurons"])):
            rows.append({
                "tower": tower,
                "layer": layer,
                "kept_heads": int(heads),
                "kept_neurons": int(neurons),
                "kept_heads_pct": 100.0 * heads / info["total_heads"],
                "kept_neurons_pct": 100.0 * neurons / info["total_neurons"],
            })
    return rows


def pareto_point(metrics: dict) -> dict:
    """The run's point of the accuracy-vs-MAC plot: kept MAC %, top-1 % and R@1 % of the final model."""
    summary = metrics.get("summary", {})
    final = metrics.get("pruned") or metrics["dense"]
    kept = final.get("kept_mac_fraction", 1.0)
    point = {"method": summary.get("method", "pruned" if "pruned" in metrics else "dense"),
             "constraint": summary.get("constraint"),
             "kept_mac_pct": 100.0 * kept}
    top1 = final.get("zeroshot", {}).get("acc1")
    if top1 is not None:
        point["top1"] = 100.0 * top1
    r1 = final.get("retrieval", {}).get("image_retrieval_recall@1")
    if r1 is not None:
        point["r1_t2i"] = 100.0 * r1
    return {key: value for key, value in point.items() if value is not None}


STEP_ORDER = ("search", "rearranged", "tuned")  # pipeline order; other steps follow by name
PRUNING_ORDER = ("score", "search", "tune")  # the pruning stages of the wall-time table, in pipeline order


def ordered_steps(steps: dict) -> list[tuple[str, dict]]:
    """``metrics["steps"]`` items in pipeline order (metrics.json stores keys sorted by name)."""
    rank = {name: i for i, name in enumerate(STEP_ORDER)}
    return sorted(steps.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def _pct(value) -> str:
    return "–" if value is None else f"{100.0 * value:.2f}"


def _num(value, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(pruned, dense) -> str:
    return "–" if pruned is None or not dense else f"{pruned / dense:.3f}"


def _get(metrics: dict | None, *keys):
    for key in keys:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def _has(metrics: dict | None, *keys) -> bool:
    """Whether the key path exists (its value may be null, e.g. acc5 of a set with fewer than 5 classes)."""
    *parents, last = keys
    parent = _get(metrics, *parents) if parents else metrics
    return isinstance(parent, dict) and last in parent


# (label, path in a model's metrics, formatter) of the dense-vs-pruned table
_MODEL_ROWS = (
    ("zero-shot top-1 (%)", ("zeroshot", "acc1"), _pct),
    ("zero-shot top-5 (%)", ("zeroshot", "acc5"), _pct),
    ("mean per-class recall (%)", ("zeroshot", "mean_per_class_recall"), _pct),
    ("text→image R@1 (%)", ("retrieval", "image_retrieval_recall@1"), _pct),
    ("text→image R@5 (%)", ("retrieval", "image_retrieval_recall@5"), _pct),
    ("text→image R@10 (%)", ("retrieval", "image_retrieval_recall@10"), _pct),
    ("image→text R@1 (%)", ("retrieval", "text_retrieval_recall@1"), _pct),
    ("image→text R@5 (%)", ("retrieval", "text_retrieval_recall@5"), _pct),
    ("image→text R@10 (%)", ("retrieval", "text_retrieval_recall@10"), _pct),
    ("GMACs (whole model)", ("complexity", "gmacs"), lambda v: _num(v, ".4f")),
    ("prunable GMACs", ("complexity", "prunable_gmacs"), lambda v: _num(v, ".4f")),
    ("params (M)", ("complexity", "params"), lambda v: _num(None if v is None else v / 1e6, ".3f")),
    ("image batch latency (ms, interleaved median)", ("latency_ms", "image_batch"), lambda v: _num(v, ".1f")),
    ("text batch latency (ms, interleaved median)", ("latency_ms", "text_batch"), lambda v: _num(v, ".1f")),
)


def summary_markdown(metrics: dict, kept: dict[str, dict] | None) -> str:
    """reports/summary.md: dense vs pruned, the pruning steps, kept units per layer, and timings."""
    dense, pruned = metrics["dense"], metrics.get("pruned")
    summary = metrics.get("summary", {})
    lines = ["# clipprune report", ""]
    if pruned is not None:
        lines += [f"Method **{summary.get('method', '?')}**, constraint {summary.get('constraint', '?')}: the "
                  f"pruned model keeps {_pct(pruned.get('kept_mac_fraction'))} % of the prunable MACs of the "
                  f"searched towers and {_pct(pruned.get('params_ratio'))} % of the parameters.", ""]
    else:
        lines += ["No pruned model: dense metrics only.", ""]

    lines += ["## Dense vs pruned", "", "| metric | dense | pruned | pruned / dense |", "|---|---|---|---|"]
    undefined_top5 = False
    for label, path, fmt in _MODEL_ROWS:
        if not (_has(dense, *path) or _has(pruned, *path)):
            continue
        d, p = _get(dense, *path), _get(pruned, *path)
        undefined_top5 |= path == ("zeroshot", "acc5") and d is None and p is None
        lines.append(f"| {label} | {fmt(d)} | {fmt(p)} | {_ratio(p, d)} |")
    if pruned is not None:
        lines.append(f"| file size (MB, float32) | {_num(metrics.get('dense_file_mb'), '.2f')} | "
                     f"{_num(pruned.get('file_mb'), '.2f')} | {_ratio(pruned.get('file_mb'), metrics.get('dense_file_mb'))} |")
        ratios = pruned.get("latency_ratio", {})
        spread = metrics.get("latency_rounds", {}).get("ratio_range", {})
        for tower in ("image", "text"):
            low_high = spread.get(tower)
            span = f" ({_num(low_high[0])}–{_num(low_high[1])})" if low_high else ""
            lines.append(f"| {tower} latency ratio (interleaved median; min–max over rounds) | 1 | "
                         f"{_num(ratios.get(tower))}{span} | |")
    lines.append("")
    rounds = metrics.get("latency_rounds")
    if pruned is not None and rounds:
        load = rounds.get("load_average_1m")
        lines += [f"Latency: one measurement, the final and the dense model timed alternately over "
                  f"{rounds.get('rounds', '?')} rounds (ms above are the medians, the ratio the median of the "
                  f"per-round ratios, with their min–max). 1-minute load average when it began: "
                  f"{_num(load, '.2f')}" + (" (the machine was busy: compare ratios, not milliseconds)."
                                            if load is not None and load > 1.0 else "."), ""]
    if undefined_top5:
        lines += ["Top-5 is undefined with fewer than 5 classes (null in metrics.json; CLIP_benchmark reports "
                  "NaN).", ""]

    steps = metrics.get("steps")
    if steps:
        lines += ["## Pruning steps (dense model under each step's masks)", "",
                  "| step | top-1 (%) | text→image R@1 (%) | image→text R@1 (%) |", "|---|---|---|---|"]
        for step, values in ordered_steps(steps):
            lines.append(f"| {step} | {_pct(_get(values, 'zeroshot', 'acc1'))} | "
                         f"{_pct(_get(values, 'retrieval', 'image_retrieval_recall@1'))} | "
                         f"{_pct(_get(values, 'retrieval', 'text_retrieval_recall@1'))} |")
        lines.append("")

    if kept:
        lines += ["## Kept units per layer", "", "| tower | layer | heads kept | neurons kept |", "|---|---|---|---|"]
        for tower, info in kept.items():
            for layer, (heads, neurons) in enumerate(zip(info["kept_heads"], info["kept_neurons"])):
                lines.append(f"| {tower} | {layer} | {heads} / {info['total_heads']} | "
                             f"{neurons} / {info['total_neurons']} |")
        lines.append("")

    times = metrics.get("pruning_time_s")
    if times:
        lines += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
        pruning = {name: s for name, s in times.items() if name not in ("total", "distill")}
        for name in sorted(pruning, key=lambda n: (PRUNING_ORDER.index(n) if n in PRUNING_ORDER else 99, n)):
            lines.append(f"| {name} | {pruning[name]:.2f} |")
        if "total" in times:
            lines.append(f"| **pruning total** ({' + '.join(pruning) or 'none'}) | **{times['total']:.2f}** |")
        if "distill" in times:
            lines.append(f"| **distillation total** | **{times['distill']:.2f}** |")
        lines.append("")
    return "\n".join(lines)
