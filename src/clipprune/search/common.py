"""What every mask search shares: input checks, the flattened search problem, greedy filling, summaries.

Scores and masks are dicts keyed ``"<tower>.head"`` (``[layers, heads]``) and ``"<tower>.neuron"``
(``[layers, ffn_dim]``). For a tower whose blocks were already pruned to different widths the second
dimension is the widest block (the convention of ``models.masks``): score entries past a block's width are
ignored and the matching mask entries are 0.

The towers searched are those named by the scores. The budget is ``floor(constraint × dense cost)``, the dense
cost being every current head and neuron of the searched towers under ``flops.unit_costs``; a mask kind that
has no scores (say a tower scored on neurons only) is kept whole and its cost is charged to the budget first.
All cost arithmetic is in exact integers, so "within budget" never depends on float rounding.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.models.base import BlockView

KINDS = ("head", "neuron")
_KEY = re.compile(r"^(?P<tower>[A-Za-z0-9_]+)\.(?P<kind>head|neuron)$")


# ---------------------------------------------------------------------------------------------
# input checks (the params themselves, constraint, metric and options, are checked by clipprune.config)
# ---------------------------------------------------------------------------------------------
def parse_score_key(key) -> tuple[str, str]:
    """``"vision.head"`` -> ``("vision", "head")``; MaskError for any other key."""
    match = _KEY.match(key) if isinstance(key, str) else None
    if not match:
        raise MaskError(f"scores key {key!r} is malformed (expected '<tower>.head' or '<tower>.neuron')")
    return match["tower"], match["kind"]


def _widths(views: Sequence[BlockView], kind: str) -> list[int]:
    return [v.num_heads if kind == "head" else v.ffn_dim for v in views]


def _as_views(views: Mapping[str, Sequence[BlockView]]) -> dict[str, list[BlockView]]:
    if not isinstance(views, Mapping):
        raise ParamError(f"views must be a dict of tower name to a list of BlockView, got {type(views).__name__}")
    return flops.as_tower_views(views)


def check_scores(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]]) -> list[str]:
    """Check that ``scores`` fit the towers in ``views``; return the searched tower names, sorted.

    MaskError (one line, naming the key) for: no scores, a malformed key or unknown tower, a value that is
    not a real tensor, a shape other than ``[layers, widest block]``, NaN or inf inside a block's width.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise MaskError(f"scores: expected a non-empty dict of score tensors, got {type(scores).__name__}")
    tower_views = _as_views(views)
    towers = set()
    for key, value in scores.items():
        tower, kind = parse_score_key(key)
        if tower not in tower_views:
            raise MaskError(f"scores key {key!r} names tower {tower!r}, but the model has towers "
                            f"{sorted(tower_views)}")
        if not isinstance(value, torch.Tensor) or value.dtype == torch.bool or value.is_complex():
            raise MaskError(f"scores {key} must be a real-valued tensor, got "
                            f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
        widths = _widths(tower_views[tower], kind)
        expected = (len(widths), max(widths, default=0))
        if tuple(value.shape) != expected:
            raise MaskError(f"scores {key} has shape {list(value.shape)}, expected {list(expected)} "
                            f"([layers, {'heads' if kind == 'head' else 'ffn_dim'}])")
        values = value.detach().to("cpu", torch.float64)
        for layer, width in enumerate(widths):
            if not bool(torch.isfinite(values[layer, :width]).all()):
                raise MaskError(f"scores contain NaN or inf in {key} (layer {layer})")
        towers.add(tower)
    return sorted(towers)


# ---------------------------------------------------------------------------------------------
# the flattened problem
# ---------------------------------------------------------------------------------------------
@dataclass
class UnitSet:
    """All scored units of one kind across the searched towers, flattened in a fixed order.

    Order: towers by name, then layer, then unit index, so ties broken "by index" are reproducible whatever
    order the score dict was built in. Units of one layer are contiguous: ``layer_slices[g]`` for global
    layer ``g`` (an index into ``SearchProblem.layers``).
    """

    kind: str
    towers: tuple[str, ...]  # towers whose scores hold this kind
    scores: np.ndarray  # float64 [n]
    costs: np.ndarray  # int64 [n]
    layer_slices: list[tuple[int, int]] = field(default_factory=list)
    # where each segment of units goes back: (mask key, mask shape, flat position in the mask of each unit)
    segments: list[tuple[str, tuple[int, int], np.ndarray, int]] = field(default_factory=list)


@dataclass
class SearchProblem:
    towers: list[str]
    metric: str
    constraint: float
    layers: list[tuple[str, int]]  # global layer id -> (tower, layer index)
    layer_views: list[BlockView]
    units: dict[str, UnitSet]  # scored kinds only ("head" and/or "neuron")
    dense_cost: int  # every current head and neuron of the searched towers
    fixed_cost: int  # units of kinds without scores, always kept
    budget: int  # floor(constraint × dense_cost)

    @property
    def available(self) -> int:
        """Budget left for the scored units once unscored units are paid for."""
        return self.budget - self.fixed_cost

    def masks(self, keep: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Binary float32 masks (same keys and shapes as the scores) from per-kind keep flags."""
        out = {}
        for kind, unit_set in self.units.items():
            flags = keep[kind]
            for key, shape, positions, start in unit_set.segments:
                flat = np.zeros(shape[0] * shape[1], dtype=np.float32)
                flat[positions] = flags[start:start + len(positions)]
                out[key] = torch.from_numpy(flat.reshape(shape))
        return out

    def kept_cost(self, keep: Mapping[str, np.ndarray]) -> int:
        return self.fixed_cost + sum(int(self.units[k].costs[keep[k]].sum()) for k in self.units)


def _unit_l2(values: np.ndarray) -> np.ndarray:
    """Scale one layer's scores of one kind to unit L2 norm (Molchanov-style); an all-zero row stays zero."""
    norm = math.sqrt(float(np.dot(values, values)))
    return values / norm if norm > 0 else values


def build_problem(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]], constraint,
                  metric: str = "mac", normalize: str = "none") -> SearchProblem:
    """Check the scores against the model and flatten them into a :class:`SearchProblem` (module docstring).

    ``constraint`` in (0, 1], ``metric`` "mac" | "params" and ``normalize`` "none" | "layer" are taken as
    given (params.yaml is validated by ``clipprune.config``).
    """
    constraint = float(constraint)
    towers = check_scores(scores, views)
    tower_views = _as_views(views)

    layers, layer_views = [], []
    for tower in towers:
        for layer, view in enumerate(tower_views[tower]):
            layers.append((tower, layer))
            layer_views.append(view)

    dense_cost = flops.prunable_macs({t: tower_views[t] for t in towers}, metric)
    if dense_cost <= 0:
        raise MaskError(f"the searched towers {towers} have no prunable heads or neurons")
    if dense_cost >= 2 ** 53:
        raise MaskError(f"prunable cost {dense_cost} of towers {towers} is too large for exact search arithmetic")

    units, fixed_cost = {}, 0
    for kind in KINDS:
        present = [t for t in towers if f"{t}.{kind}" in scores]
        # units of this kind in towers without scores for it are kept whole
        for tower in towers:
            if tower not in present:
                for view in tower_views[tower]:
                    head_cost, neuron_cost = flops.unit_costs(view, metric)
                    fixed_cost += view.num_heads * head_cost if kind == "head" else view.ffn_dim * neuron_cost
        if not present:
            continue
        all_scores, all_costs, slices, segments = [], [], [], []
        offset, starts = 0, {}
        tables = {t: scores[f"{t}.{kind}"].detach().to("cpu", torch.float64).numpy() for t in present}
        for g, ((tower, layer), view) in enumerate(zip(layers, layer_views)):
            if tower not in present:
                slices.append((offset, offset))
                continue
            starts.setdefault(tower, offset)
            width = view.num_heads if kind == "head" else view.ffn_dim
            row = tables[tower][layer, :width] + 0.0  # turn -0.0 into 0.0 so sorting never tells them apart
            if normalize == "layer":
                row = _unit_l2(row)
            head_cost, neuron_cost = flops.unit_costs(view, metric)
            all_scores.append(row)
            all_costs.append(np.full(width, head_cost if kind == "head" else neuron_cost, dtype=np.int64))
            slices.append((offset, offset + width))
            offset += width
        for tower in present:
            key = f"{tower}.{kind}"
            shape = tuple(scores[key].shape)
            positions = [np.arange(layer * shape[1], layer * shape[1] + (v.num_heads if kind == "head" else v.ffn_dim))
                         for layer, v in enumerate(tower_views[tower])]
            flat_positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
            segments.append((key, shape, flat_positions, starts.get(tower, offset)))
        units[kind] = UnitSet(kind=kind, towers=tuple(present), scores=np.concatenate(all_scores) if all_scores else np.zeros(0),
                              costs=np.concatenate(all_costs) if all_costs else np.zeros(0, np.int64),
                              layer_slices=slices, segments=segments)

    budget = math.floor(constraint * dense_cost)
    problem = SearchProblem(towers=towers, metric=metric, constraint=constraint, layers=layers,
                            layer_views=layer_views, units=units, dense_cost=dense_cost, fixed_cost=fixed_cost,
                            budget=budget)
    if problem.available < 0:
        unscored = [f"{t}.{k}" for t in towers for k in KINDS if f"{t}.{k}" not in scores]
        raise ParamError(f"search.constraint {constraint} allows {budget} {metric} but the units without scores "
                         f"({', '.join(unscored)}) alone cost {fixed_cost}")
    return problem


# ---------------------------------------------------------------------------------------------
# sorting and greedy filling
# ---------------------------------------------------------------------------------------------
def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices sorting ``values`` from largest to smallest; equal values keep index order (stable)."""
    return np.argsort(-values, kind="stable")


class GreedyFiller:
    """Greedy knapsack fill over units already sorted by preference: keep each unit if it still fits.

    Vectorised over many starting budgets at once. Units come in a few cost classes (one per tower and
    kind); once a unit of cost c no longer fits, no unit of cost >= c ever will, so the walk is a few
    phases, each the longest run of still-affordable units that fits, found by ``searchsorted`` on a
    cumulative-cost array restricted to the affordable classes. At most one phase per cost class.
    The result keeps the budget and leaves less than the cost of any unit it did not keep.
    """

    def __init__(self, costs: np.ndarray, scores: np.ndarray):
        self.costs = np.asarray(costs, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float64)
        self.levels = np.unique(self.costs)  # ascending cost classes
        zero = np.zeros(1)
        self.cum_cost, self.cum_score = [], []
        for level in self.levels:
            affordable = self.costs <= level
            self.cum_cost.append(np.concatenate([zero.astype(np.int64), np.cumsum(np.where(affordable, self.costs, 0))]))
            self.cum_score.append(np.concatenate([zero, np.cumsum(np.where(affordable, self.scores, 0.0))]))

    def _level(self, remaining: np.ndarray) -> np.ndarray:
        """Index of the dearest class that still fits in ``remaining`` (-1: none)."""
        return np.searchsorted(self.levels, remaining, side="right") - 1

    def run(self, budgets: np.ndarray, record: bool = False):
        """Fill from each budget; return (score gained, cost spent[, kept flags if ``record``])."""
        budgets = np.asarray(budgets, dtype=np.int64)
        n = len(self.costs)
        remaining = budgets.copy()
        gained = np.zeros(len(budgets))
        position = np.zeros(len(budgets), dtype=np.int64)
        level = self._level(remaining) if n else np.full(len(budgets), -1)
        kept = np.zeros(n, dtype=bool) if record else None
        while True:
            active = (level >= 0) & (position < n)
            if not active.any():
                break
            for k in np.unique(level[active]):
                rows = np.nonzero(active & (level == k))[0]
                cum_cost, cum_score = self.cum_cost[k], self.cum_score[k]
                start = position[rows]
                stop = np.searchsorted(cum_cost, cum_cost[start] + remaining[rows], side="right") - 1
                remaining[rows] -= cum_cost[stop] - cum_cost[start]
                gained[rows] += cum_score[stop] - cum_score[start]
                position[rows] = stop
                if record:
                    for a, b in zip(start, stop):
                        kept[a:b] |= self.costs[a:b] <= self.levels[k]
            # the unit at `position` did not fit: only cheaper classes remain affordable
            level = np.where(position >= n, -1, self._level(remaining))
        spent = budgets - remaining
        return (gained, spent, kept) if record else (gained, spent)


def greedy_keep(costs: np.ndarray, scores: np.ndarray, candidates: np.ndarray, budget: int) -> np.ndarray:
    """Indices among ``candidates`` kept by a greedy best-score-first fill of ``budget``."""
    order = candidates[descending_order(scores[candidates])]
    _, _, kept = GreedyFiller(costs[order], scores[order]).run(np.array([budget]), record=True)
    return order[kept]


# ---------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------
def _rows(mask: torch.Tensor, widths: Sequence[int], key: str) -> list[torch.Tensor]:
    """Per-layer rows of a (possibly padded) mask, checked against the layer widths."""
    mask = torch.as_tensor(mask).detach().cpu()
    expected = (len(widths), max(widths, default=0))
    if tuple(mask.shape) != expected:
        raise MaskError(f"mask {key} has shape {list(mask.shape)}, expected {list(expected)}")
    for layer, width in enumerate(widths):
        if bool((mask[layer, width:] != 0).any()):
            raise MaskError(f"mask {key} layer {layer} has only {width} units, but nonzero entries past column {width}")
    return [mask[layer, :width] for layer, width in enumerate(widths)]


def mask_summary(masks: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]],
                 metric: str = "mac") -> dict:
    """Kept heads / neurons per layer and the kept share of the prunable cost, JSON-ready.

    Returns ``{"metric", "kept_fraction" (over the towers the masks name), "towers": {tower: {"heads",
    "num_heads", "neurons", "ffn_dim" (lists per layer), "layer_kept_fraction" (list), "kept_fraction"}}}``.
    A kind missing from ``masks`` counts as fully kept. Non-zero entries count as kept.
    """
    tower_views = _as_views(views)
    towers = sorted({parse_score_key(key)[0] for key in masks})
    unknown = [t for t in towers if t not in tower_views]
    if unknown:
        raise MaskError(f"masks name tower(s) {unknown}, but the model has towers {sorted(tower_views)}")
    rows = {}
    for key, mask in masks.items():
        tower, kind = parse_score_key(key)
        rows[key] = _rows(mask, _widths(tower_views[tower], kind), key)
    summary = {"metric": metric,
               "kept_fraction": flops.kept_fraction({t: tower_views[t] for t in towers}, rows, metric),
               "towers": {}}
    for tower in towers:
        tower_rows = {key: value for key, value in rows.items() if key.startswith(f"{tower}.")}
        views_t = tower_views[tower]
        heads = (flops.kept_counts(tower_rows[f"{tower}.head"], _widths(views_t, "head"), f"{tower}.head")
                 if f"{tower}.head" in tower_rows else _widths(views_t, "head"))
        neurons = (flops.kept_counts(tower_rows[f"{tower}.neuron"], _widths(views_t, "neuron"), f"{tower}.neuron")
                   if f"{tower}.neuron" in tower_rows else _widths(views_t, "neuron"))
        layer_fraction = []
        for view, h, n in zip(views_t, heads, neurons):
            head_cost, neuron_cost = flops.unit_costs(view, metric)
            dense = view.num_heads * head_cost + view.ffn_dim * neuron_cost
            layer_fraction.append((h * head_cost + n * neuron_cost) / dense if dense else 0.0)
        summary["towers"][tower] = {
            "heads": heads, "num_heads": _widths(views_t, "head"),
            "neurons": neurons, "ffn_dim": _widths(views_t, "neuron"),
            "layer_kept_fraction": layer_fraction,
            "kept_fraction": flops.kept_fraction({tower: views_t}, tower_rows, metric),
        }
    return summary
