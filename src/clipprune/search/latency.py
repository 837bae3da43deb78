"""Latency-constrained search (``search.metric: latency``): Kwon et al.'s search with measured costs.

The latency table (``clipprune.deploy.latency_table``) holds, per tower, the measured wall time of one
attention sub-block as a function of its kept heads and of one MLP as a function of its kept neurons (on the
device and at the batch size of ``evaluate.latency``), and of the whole dense tower. Each curve is fitted, as
in Kwon's reference, by a piecewise-linear function of the kept count ``x``::

    f(0) = 0 (the sub-block is dropped);  f(x) = c for 1 <= x <= t;  f(x) = c + slope * (x - t) for x > t

(``t``, ``c`` and ``slope >= 0`` chosen by least squares over the measured points; see :func:`fit_piecewise`).
The search then keeps, in every layer, the ``t`` best-scored heads and neurons (they cost ``c`` together,
below ``t`` the time does not fall) and ranks the remaining units globally with cost ``slope`` each: the MAC
search (``search.mac.solve``) on these linear costs. The constraint is the kept fraction of the dense
*measured* tower time: what the blocks do not explain (embeddings, final norm, projection; "overhead") is
charged to the budget first, so the exported model's measured ratio is what the constraint asks for.

Costs are exact integers (picoseconds), like the MAC search's, so "within budget" never depends on float
rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from clipprune.errors import MaskError, ParamError
from clipprune.models.base import BlockView

from .common import SearchProblem, UnitSet, check_scores, _as_views, _unit_l2

PICOSECONDS = 1e12  # integer cost unit


@dataclass(frozen=True)
class PiecewiseLinear:
    """``f(0) = 0``, ``f(x) = c`` for ``1 <= x <= threshold``, ``c + slope (x - threshold)`` above."""

    threshold: int
    c: float
    slope: float

    def __call__(self, x) -> float:
        x = float(x)
        if x <= 0:
            return 0.0
        return self.c + self.slope * max(0.0, x - self.threshold)

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "c": self.c, "slope": self.slope}

    def scaled(self, factor: float) -> "PiecewiseLinear":
        return PiecewiseLinear(self.threshold, self.c * factor, self.slope * factor)


def fit_piecewise(widths: Sequence[int], seconds: Sequence[float]) -> PiecewiseLinear:
    """Least-squares piecewise-linear fit of measured ``seconds`` at kept counts ``widths`` (all >= 1).

    For every candidate threshold ``t`` among the measured widths: ``c`` is the mean time at widths <= t,
    ``slope`` the least-squares slope (through ``(t, c)``, clipped at 0) of the times above ``t``; the ``t``
    with the smallest squared error wins (the smallest ``t`` among equals).
    """
    x = np.asarray(widths, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0 or (x < 1).any() or not np.isfinite(y).all():
        raise MaskError(f"latency table: a curve needs matching widths >= 1 and finite times, got {list(widths)}, "
                        f"{list(seconds)}")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    best = None
    for t in np.unique(x):
        low = x <= t
        c = float(y[low].mean())
        dx, dy = x[~low] - t, y[~low] - c
        slope = float((dx * dy).sum() / (dx * dx).sum()) if dx.size else 0.0
        slope = max(slope, 0.0)
        error = float(((y - (c + slope * np.maximum(x - t, 0.0))) ** 2).sum())
        if best is None or error < best[0] - 1e-30:
            best = (error, PiecewiseLinear(int(t), c, slope))
    return best[1]


@dataclass(frozen=True)
class TowerLatency:
    """The fitted latency model of one tower (uniform blocks)."""

    layers: int
    num_heads: int
    ffn_dim: int
    dense_seconds: float  # the whole dense tower, measured
    attention: PiecewiseLinear
    mlp: PiecewiseLinear

    @property
    def overhead(self) -> float:
        """Measured dense time the fitted blocks do not explain (embeddings, norms, pooling, projection)."""
        return self.dense_seconds - self.layers * (self.attention(self.num_heads) + self.mlp(self.ffn_dim))

    def predict(self, heads: Sequence[int], neurons: Sequence[int]) -> float:
        """Predicted tower time with the given kept heads / neurons per layer."""
        return self.overhead + sum(self.attention(h) + self.mlp(n) for h, n in zip(heads, neurons))


def tower_latencies(table: Mapping) -> dict[str, TowerLatency]:
    """Fit the curves of a latency table (``deploy.latency_table`` format) into :class:`TowerLatency` per tower."""
    out = {}
    for tower, entry in table["towers"].items():
        layers, heads, ffn = int(entry["layers"]), int(entry["num_heads"]), int(entry["ffn_dim"])
        dense = float(entry["dense_seconds"])
        attention = fit_piecewise(entry["attention"]["widths"], entry["attention"]["seconds"])
        mlp = fit_piecewise(entry["mlp"]["widths"], entry["mlp"]["seconds"])
        blocks = layers * (attention(heads) + mlp(ffn))
        skeleton = entry.get("skeleton_seconds")
        if skeleton is not None and blocks > 0 and dense > skeleton:
            # blocks run slower inside the tower than alone: scale the curves so that blocks + skeleton = dense
            factor = (dense - float(skeleton)) / blocks
            attention, mlp = attention.scaled(factor), mlp.scaled(factor)
        out[tower] = TowerLatency(layers=layers, num_heads=heads, ffn_dim=ffn, dense_seconds=dense,
                                  attention=attention, mlp=mlp)
    return out


def _ps(seconds: float) -> int:
    return int(round(seconds * PICOSECONDS))


def build_latency_problem(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]],
                          constraint: float, models: Mapping[str, TowerLatency], normalize: str = "none"
                          ) -> tuple[SearchProblem, dict[str, np.ndarray]]:
    """The latency search as a :class:`SearchProblem` over the units above each layer's threshold.

    Returns the problem and the base keep flags (``{"<tower>.<kind>": bool [layers, width]}``: each layer's
    ``threshold`` best units, always kept). Needs head and neuron scores for every searched tower.
    """
    towers = check_scores(scores, views)
    tower_views = _as_views(views)
    for tower in towers:
        for kind in ("head", "neuron"):
            if f"{tower}.{kind}" not in scores:
                raise MaskError(f"search.metric latency needs {kind} scores of the {tower} tower (score.criterion "
                                f"with heads and neurons)")
        if tower not in models:
            raise MaskError(f"the latency table has no {tower} tower (it has {sorted(models)})")
        model, tv = models[tower], tower_views[tower]
        if len(tv) != model.layers or any(v.num_heads != model.num_heads or v.ffn_dim != model.ffn_dim for v in tv):
            raise MaskError(f"the latency table's {tower} tower ({model.layers} layers x {model.num_heads} heads, "
                            f"ffn_dim {model.ffn_dim}) does not match the model's")
    dense = sum(models[t].dense_seconds for t in towers)
    fixed = sum(models[t].overhead + models[t].layers * (models[t].attention.c + models[t].mlp.c) for t in towers)
    budget, fixed_cost = _ps(constraint * dense), _ps(fixed)
    if budget < fixed_cost:
        raise ParamError(f"search.constraint must be >= {fixed / dense:.4f} for this latency table (every layer "
                         f"keeps its heads and neurons below the fitted thresholds), got {constraint}")
    layers, layer_views, units, base = [], [], {}, {}
    for tower in towers:
        for layer, view in enumerate(tower_views[tower]):
            layers.append((tower, layer))
            layer_views.append(view)
    for kind in ("head", "neuron"):
        all_scores, all_costs, slices, segments, offset = [], [], [], [], 0
        for tower in towers:
            key, model = f"{tower}.{kind}", models[tower]
            curve = model.attention if kind == "head" else model.mlp
            table = scores[key].detach().to("cpu", torch.float64).numpy()
            shape = tuple(table.shape)
            flags = np.zeros(shape, dtype=bool)
            positions, start = [], offset
            for layer, view in enumerate(tower_views[tower]):
                width = view.num_heads if kind == "head" else view.ffn_dim
                row = table[layer, :width] + 0.0
                if normalize == "layer":
                    row = _unit_l2(row)
                order = np.argsort(-row, kind="stable")
                flags[layer, order[:min(curve.threshold, width)]] = True
                rest = np.sort(order[min(curve.threshold, width):])
                all_scores.append(row[rest])
                all_costs.append(np.full(len(rest), _ps(curve.slope), dtype=np.int64))
                slices.append((offset, offset + len(rest)))
                positions.append(layer * shape[1] + rest)
                offset += len(rest)
            base[key] = flags
            segments.append((key, shape, np.concatenate(positions).astype(np.int64), start))
        units[kind] = UnitSet(kind=kind, towers=tuple(towers), scores=np.concatenate(all_scores),
                              costs=np.concatenate(all_costs), layer_slices=slices, segments=segments)
    problem = SearchProblem(towers=towers, metric="latency", constraint=constraint, layers=layers,
                            layer_views=layer_views, units=units, dense_cost=_ps(dense), fixed_cost=fixed_cost,
                            budget=budget)
    return problem, base


def latency_search(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]],
                   constraint: float, models: Mapping[str, TowerLatency], normalize: str = "none",
                   report: dict | None = None) -> dict[str, torch.Tensor]:
    """Binary masks whose predicted latency is at most ``constraint`` × the dense measured latency."""
    from .mac import _require_nonnegative, solve

    problem, base = build_latency_problem(scores, views, constraint, models, normalize)
    _require_nonnegative(problem)
    keep, info = solve(problem)
    masks = problem.masks(keep)
    for key, flags in base.items():
        masks[key] = torch.maximum(masks[key], torch.from_numpy(flags.astype(np.float32)))
    if report is not None:
        report.update(predicted_fraction=predicted_fraction(masks, models), head_count=info["head_count"],
                      fits={t: {"attention": models[t].attention.as_dict(), "mlp": models[t].mlp.as_dict(),
                                "overhead_s": models[t].overhead, "dense_s": models[t].dense_seconds}
                            for t in problem.towers})
    return masks


def kept_per_layer(masks: Mapping[str, torch.Tensor], tower: str) -> tuple[list[int], list[int]]:
    heads = [int(n) for n in (masks[f"{tower}.head"] != 0).sum(dim=1).tolist()]
    neurons = [int(n) for n in (masks[f"{tower}.neuron"] != 0).sum(dim=1).tolist()]
    return heads, neurons


def predicted_fraction(masks: Mapping[str, torch.Tensor], models: Mapping[str, TowerLatency]) -> float:
    """Predicted latency of the towers ``masks`` name, as a fraction of their dense measured latency."""
    towers = sorted({key.split(".")[0] for key in masks})
    kept = sum(models[t].predict(*kept_per_layer(masks, t)) for t in towers)
    return kept / sum(models[t].dense_seconds for t in towers)


def latency_cost(models: Mapping[str, TowerLatency]):
    """``cost(tower, layer, kind, count)`` in integer picoseconds (for ``search.align``)."""
    def cost(tower: str, layer: int, kind: str, count: int) -> int:
        curve = models[tower].attention if kind == "head" else models[tower].mlp
        return _ps(curve(count))
    return cost

