"""Kwon et al.'s (2022) mask search: the best head count with the remaining budget spent on top neurons.

All heads of the searched towers are ranked by score in one list, all neurons in another. For every head
count h = 0 … H the search keeps the h best heads, spends what is left of the budget on neurons (best
first, each one kept if it still fits), and returns the h whose kept units have the largest summed score.
Scores are compared raw, as in the reference (no normalisation), unless ``normalize="layer"``.

Properties (tested): the kept cost never exceeds the budget; what is left of it is smaller than the cost
of every neuron not kept; among "top-h heads + greedy neurons" choices the result has the largest summed
score, which for a single tower (one head cost, one neuron cost) is the exact optimum over all masks.
The result is a pure function of the scores: stable sorts break ties by (tower name, layer, index), and
among equally scored choices the one spending more of the budget, then the one with fewer heads, wins.

Only kinds that have scores are searched: with neuron scores alone the heads stay and only neurons are
filled (and vice versa, heads filled greedily).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from clipprune.errors import MaskError
from clipprune.models.base import BlockView

from .common import GreedyFiller, SearchProblem, build_problem, descending_order
from .registry import register_search


def _require_nonnegative(problem: SearchProblem) -> None:
    # the objective "sum of kept scores" only ranks choices sensibly for importances (>= 0)
    for kind, units in problem.units.items():
        if units.scores.size and units.scores.min() < 0:
            worst = int(np.argmin(units.scores))
            for key, _, positions, start in units.segments:
                if start <= worst < start + len(positions):
                    raise MaskError(f"search 'mac' needs non-negative importance scores; {key} has "
                                    f"{units.scores[worst]:g}")
            raise MaskError(f"search 'mac' needs non-negative importance scores; {kind} scores have negatives")


def solve(problem: SearchProblem) -> tuple[dict[str, np.ndarray], dict]:
    """Run the search on a built problem; return (keep flags per kind, diagnostics)."""
    heads, neurons = problem.units.get("head"), problem.units.get("neuron")
    # enumerate head counts only when neurons are there to fill; otherwise greedily fill whichever kind exists
    has_neurons = neurons is not None and len(neurons.scores) > 0
    primary = heads if (heads is not None and has_neurons) else None
    filler_units = neurons if has_neurons or heads is None else heads
    available = problem.available

    if primary is not None:
        primary_order = descending_order(primary.scores)
        cum_cost = np.concatenate([[0], np.cumsum(primary.costs[primary_order])]).astype(np.int64)
        cum_score = np.concatenate([[0.0], np.cumsum(primary.scores[primary_order])])
        most_heads = int(np.searchsorted(cum_cost, available, side="right")) - 1
        cum_cost, cum_score = cum_cost[:most_heads + 1], cum_score[:most_heads + 1]
    else:
        primary_order = np.zeros(0, dtype=np.int64)
        cum_cost, cum_score = np.zeros(1, dtype=np.int64), np.zeros(1)

    fill_order = descending_order(filler_units.scores)
    filler = GreedyFiller(filler_units.costs[fill_order], filler_units.scores[fill_order])
    gained, spent = filler.run(available - cum_cost)
    objective = cum_score + gained
    kept_cost = cum_cost + spent

    best = objective.max()
    tied = np.nonzero(objective == best)[0]
    head_count = int(tied[np.argmax(kept_cost[tied])])  # argmax returns the first, i.e. fewest heads

    keep = {}
    if primary is not None:
        keep["head"] = np.zeros(len(primary.scores), dtype=bool)
        keep["head"][primary_order[:head_count]] = True
    _, _, kept_sorted = filler.run(np.array([available - cum_cost[head_count]]), record=True)
    keep[filler_units.kind] = np.zeros(len(filler_units.scores), dtype=bool)
    keep[filler_units.kind][fill_order[kept_sorted]] = True
    info = {"head_count": head_count, "objective": float(best), "kept_cost": problem.fixed_cost + int(kept_cost[head_count]),
            "budget": problem.budget, "dense_cost": problem.dense_cost}
    return keep, info


@register_search("mac")
def mac_search(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]], constraint: float,
               metric: str = "mac", *, normalize: str = "none") -> dict[str, torch.Tensor]:
    """Kwon et al.'s search (see the module docstring); returns binary float32 masks keyed like ``scores``.

    ``metric`` "mac" budgets multiply-accumulates, "params" kept parameters (LFPR). ``normalize="layer"``
    scales each layer's head scores and neuron scores to unit L2 norm before ranking.
    """
    problem = build_problem(scores, views, constraint, metric, normalize)
    _require_nonnegative(problem)
    keep, _ = solve(problem)
    return problem.masks(keep)
