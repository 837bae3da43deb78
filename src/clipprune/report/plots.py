"""PNG figures of the report (matplotlib, Agg backend; byte-stable for equal inputs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path
from .tables import NEURON_BINS, neuron_bins, ordered_steps

_PNG_METADATA = {"Software": None}  # no matplotlib version in the file: equal inputs give equal bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=_PNG_METADATA, bbox_inches="tight")
    plt.close(fig)


def heatmap_matrices(kept: dict[str, dict], bins: int = NEURON_BINS) -> dict[str, dict]:
    """Per tower, what the heatmap draws: ``heads`` ``[layers, heads]`` (1 kept, 0 pruned) and ``neurons``
    ``[layers, bins]`` (kept share of each run of neurons)."""
    return {tower: {"heads": info["heads"].float(), "neurons": neuron_bins(info["neurons"], bins)}
            for tower, info in kept.items()}


def plot_kept_units(kept: dict[str, dict], path: str | Path, dpi: int = 100) -> dict[str, dict]:
    """Heatmap of kept heads (left) and neurons (right), one row of panels per tower; returns the matrices."""
    plt = _pyplot()
    matrices = heatmap_matrices(kept)
    if not matrices:  # dense model only: a placeholder keeps the declared out present
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no masks: dense model only", ha="center", va="center")
        ax.axis("off")
        _save(fig, Path(path), dpi)
        return matrices
    fig, axes = plt.subplots(len(matrices), 2, figsize=(10, 2.2 + 1.6 * len(matrices)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3]})
    for row, (tower, mats) in enumerate(matrices.items()):
        info = kept[tower]
        for col, (kind, mat) in enumerate(mats.items()):
            ax = axes[row][col]
            image = ax.imshow(mat.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_ylabel(f"{tower} layer")
            ax.set_yticks(range(mat.shape[0]))
            if kind == "heads":
                ax.set_title(f"{tower}: kept heads ({sum(info['kept_heads'])} / {mat.numel()})", fontsize=10)
                ax.set_xlabel("head")
                ax.set_xticks(range(mat.shape[1]))
            else:
                ax.set_title(f"{tower}: kept share of neurons per bin "
                             f"({sum(info['kept_neurons'])} / {info['total_neurons'] * mat.shape[0]} kept)", fontsize=10)
                ax.set_xlabel(f"neuron bin ({info['total_neurons'] / mat.shape[1]:.0f} neurons each); "
                              "right: kept count")
                for layer, count in enumerate(info["kept_neurons"]):
                    ax.text(mat.shape[1] - 0.5, layer, f" {count}", va="center", ha="left", fontsize=8)
        fig.colorbar(image, ax=axes[row].tolist(), fraction=0.02, label="kept")
    _save(fig, Path(path), dpi)
    return matrices


STEP_LABELS = {"search": "searched", "rearranged": "rearranged", "tuned": "tuned"}


def _has_path(entry: dict, key: tuple[str, str]) -> bool:
    return isinstance(entry.get(key[0]), dict) and entry[key[0]].get(key[1]) is not None


def plot_accuracy_vs_mac(metrics: dict, path: str | Path, dpi: int = 100) -> list[dict]:
    """Top-1 (or text→image R@1 without a zero-shot split) against kept MAC % for the dense model, the dense
    model under each step's masks (searched / rearranged / tuned), the exported model and, when
    distillation ran, the distilled one; each point labelled by what it is. Returns the plotted points."""
    plt = _pyplot()
    key, label = ("zeroshot", "acc1"), "zero-shot top-1 (%)"
    if "zeroshot" not in metrics["dense"]:
        key, label = ("retrieval", "image_retrieval_recall@1"), "text→image R@1 (%)"

    def value(entry):
        return 100.0 * entry[key[0]][key[1]]

    points = [{"name": "dense", "kept_mac_pct": 100.0, "value": value(metrics["dense"])}]
    pruned = metrics.get("pruned")
    if pruned is not None:
        kept_pct = 100.0 * pruned.get("kept_mac_fraction", 1.0)
        for step, entry in ordered_steps(metrics.get("steps", {})):
            points.append({"name": f"{STEP_LABELS.get(step, step)} masks", "kept_mac_pct": kept_pct,
                           "value": value(entry)})
        before = pruned.get("before_distill")
        if before is not None and _has_path(before, key):  # distillation ran: the exported model, then the final
            points.append({"name": "exported", "kept_mac_pct": kept_pct, "value": value(before)})
            points.append({"name": "distilled", "kept_mac_pct": kept_pct, "value": value(pruned)})
        else:  # no distillation: the final model is the exported one
            points.append({"name": "exported", "kept_mac_pct": kept_pct, "value": value(pruned)})
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "osD^v<>p*"
    for i, point in enumerate(points):
        ax.scatter([point["kept_mac_pct"]], [point["value"]], marker=markers[i % len(markers)], s=50,
                   label=f"{point['name']}: {point['value']:.1f}")
    ax.set_xlabel("kept prunable MACs (%)")
    ax.set_ylabel(label)
    ax.set_xlim(0, 105)
    method = metrics.get("summary", {}).get("method")
    ax.set_title("accuracy vs MACs" + (f" ({method})" if method else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, Path(path), dpi)
    return points


def plot_search_trace(trace: dict, path: Path, dpi: int = 100) -> None:
    """PNG of a search trace: held-out loss of every candidate width per block (left), kept neurons per
    block against the dense width (right). A trace without ``layers`` (non-adaptive searches) gets a note."""
    plt = _pyplot()
    layers = list(trace.get("layers") or [])
    if not layers:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"search '{trace.get('method', '?')}': no per-block trace", ha="center", va="center")
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        cmap = plt.get_cmap("viridis")
        for k, entry in enumerate(layers):
            points = sorted([(entry["width"], entry["loss_before"])]
                            + [(c["width"], c["loss"]) for c in entry["candidates"]])
            color = cmap(k / max(len(layers) - 1, 1))
            label = f"{entry['tower']} {entry['layer']}"
            left.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, color=color, label=label)
            left.plot([entry["accepted_width"]], [entry["loss_after"]], "*", ms=11, color=color)
        left.set_xlabel("kept neurons (candidate width)")
        left.set_ylabel(f"held-out {trace.get('loss', 'loss')}")
        left.set_title(f"candidates per block (★ accepted), threshold {trace.get('loss_inc_thresh')}")
        left.legend(fontsize=7, ncol=2)
        names = [f"{e['tower'][0]}{e['layer']}" for e in layers][::-1]
        dense = [e["width"] for e in layers][::-1]
        kept = [e["accepted_width"] for e in layers][::-1]
        positions = np.arange(len(names))
        right.bar(positions, dense, color="0.85", label="dense")
        right.bar(positions, kept, color="tab:blue", label="kept")
        right.set_xticks(positions, names)
        right.set_xlabel("block")
        right.set_ylabel("MLP neurons")
        right.set_title("kept neurons per block")
        right.legend(fontsize=8)
    _save(fig, path, dpi)
