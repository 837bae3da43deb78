"""Baseline search: the same kept share of cost in every layer, then a global top-up to the budget.

Exactly what it does, per layer of every searched tower (``c`` = constraint, target = c × layer cost):

1. heads: keep the ``floor(c × heads)`` best-scored heads of the layer (if the layer has no scored
   neurons, as many heads as fit in the target after the cost of its unscored neurons);
2. neurons: keep the best-scored neurons of the layer, as many as fit in what the kept heads leave of the
   target (``floor((target − kept head cost) / neuron cost)``), so the layer's kept share is c, rounded
   down to a whole neuron.
3. Then, globally: the rounding leaves less than one neuron per layer unspent; the best-scored neurons
   not yet kept (across all layers and towers, ranked by raw score) are added one by one while they fit,
   until no further neuron fits the budget (heads are topped up instead when no neuron has scores).

Every layer thus keeps the same number of heads (c × heads, rounded down) and its neuron share differs
from the others' only by the few top-up neurons (fewer in all than the number of layers, one tower).
Ties are broken by index, so the result is a pure function of the scores. Signed scores are accepted
(only their order matters).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from clipprune import flops
from clipprune.models.base import BlockView

from .common import SearchProblem, build_problem, descending_order, greedy_keep
from .registry import register_search


def _top(scores: np.ndarray, count: int) -> np.ndarray:
    return descending_order(scores)[:count]


def solve(problem: SearchProblem) -> tuple[dict[str, np.ndarray], dict]:
    """Run the search on a built problem; return (keep flags per kind, diagnostics)."""
    c = problem.constraint
    heads, neurons = problem.units.get("head"), problem.units.get("neuron")
    keep = {kind: np.zeros(len(units.scores), dtype=bool) for kind, units in problem.units.items()}

    for g, view in enumerate(problem.layer_views):
        head_cost, neuron_cost = flops.unit_costs(view, problem.metric)
        target = c * (view.num_heads * head_cost + view.ffn_dim * neuron_cost)
        head_slice = heads.layer_slices[g] if heads is not None else (0, 0)
        neuron_slice = neurons.layer_slices[g] if neurons is not None else (0, 0)
        tower = problem.layers[g][0]
        heads_scored = heads is not None and tower in heads.towers
        neurons_scored = neurons is not None and tower in neurons.towers
        # a tower may have one kind unscored: those units are kept whole and paid first
        fixed_neurons = 0 if neurons_scored else view.ffn_dim * neuron_cost
        if not heads_scored:
            kept_heads = view.num_heads
        elif neurons_scored and view.ffn_dim:
            kept_heads = math.floor(c * view.num_heads)
        else:  # no neurons to share the layer's target with: as many heads as fit
            kept_heads = math.floor((target - fixed_neurons) / head_cost) if head_cost else view.num_heads
        kept_heads = min(max(kept_heads, 0), view.num_heads)
        while heads_scored and kept_heads > 0 and kept_heads * head_cost > target:
            kept_heads -= 1  # guard against float rounding of c × heads
        if not neurons_scored:
            kept_neurons = view.ffn_dim
        else:
            left = target - kept_heads * head_cost
            kept_neurons = min(max(math.floor(left / neuron_cost), 0), view.ffn_dim) if neuron_cost else view.ffn_dim
        if heads_scored and view.num_heads:
            start, stop = head_slice
            keep["head"][start + _top(heads.scores[start:stop], kept_heads)] = True
        if neurons_scored and view.ffn_dim:
            start, stop = neuron_slice
            keep["neuron"][start + _top(neurons.scores[start:stop], kept_neurons)] = True

    # rounding per layer leaves a little budget: top it up with the finest scored kind. Float rounding or
    # unscored units dearer than a layer's target could overshoot instead: then drop the worst-scored first.
    fill_kind = "neuron" if neurons is not None and (len(neurons.scores) or heads is None) else "head"
    fill = problem.units[fill_kind]
    for kind in (fill_kind, "head"):
        excess = problem.kept_cost(keep) - problem.budget
        if excess <= 0 or kind not in problem.units:
            continue
        kept_idx = np.nonzero(keep[kind])[0]
        worst_first = kept_idx[np.argsort(problem.units[kind].scores[kept_idx], kind="stable")]
        dropped = np.searchsorted(np.cumsum(problem.units[kind].costs[worst_first]), excess, side="left") + 1
        keep[kind][worst_first[:dropped]] = False
    per_layer_cost = problem.kept_cost(keep)
    candidates = np.nonzero(~keep[fill_kind])[0]
    added = greedy_keep(fill.costs, fill.scores, candidates, problem.budget - per_layer_cost)
    keep[fill_kind][added] = True
    info = {"kept_cost": problem.kept_cost(keep), "budget": problem.budget, "dense_cost": problem.dense_cost,
            "top_up_units": int(len(added)), "top_up_kind": fill_kind}
    return keep, info


@register_search("uniform")
def uniform_search(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]], constraint: float,
                   metric: str = "mac", *, normalize: str = "none") -> dict[str, torch.Tensor]:
    """Same kept share per layer, then a global top-up (see the module docstring); binary float32 masks.

    ``normalize="layer"`` only changes which neurons win the global top-up (per-layer order is unchanged).
    """
    problem = build_problem(scores, views, constraint, metric, normalize)
    keep, _ = solve(problem)
    return problem.masks(keep)
