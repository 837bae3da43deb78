"""LFPR-style global threshold: one cut over the normalised scores of all heads and neurons together.

1. Normalise each kind separately over all searched towers (``normalize``), so heads and neurons share one
   scale: ``mean`` (default) divides by the kind's mean score, so 1.0 means "as important as the average
   unit of its kind" and the cut reads the same for heads and neurons; ``max`` by the kind's largest
   score; ``sum`` by its total (each kind's scores sum to 1, so with many more neurons than heads a neuron's
   share is far smaller and neurons go first); ``none`` compares raw scores (meaningful when both kinds come
   from one loss, as Fisher's do). A kind whose scores are all zero stays zero.
2. Rank every unit by normalised score (largest first) and keep the longest prefix whose cost fits the
   budget ``floor(constraint × prunable cost)`` under ``search.metric`` (``mac`` or ``params``), i.e. the
   lowest threshold whose kept set meets the budget. Everything above the threshold is kept, nothing below.

Budget: the kept cost never exceeds the budget, and what is left is smaller than the cost of the best unit
left out (the first one below the threshold). That unit may be a head, so unlike ``mac`` / ``param_sum``
the miss is not bounded by a neuron's cost: a single threshold cannot skip a head that does not fit and keep
lower-scored neurons instead (that would be a second threshold). Ties: exactly equal normalised scores are
ordered heads first, then by tower name, layer and index (stable sort), so a group of tied units can be
split at the threshold; the result is a pure function of the scores. Scores must be non-negative.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from clipprune.errors import MaskError
from clipprune.models.base import BlockView

from .common import KINDS, SearchProblem, build_problem, descending_order
from .registry import register_search


def _divisor(values: np.ndarray, normalize: str) -> float:
    if normalize == "none" or values.size == 0:
        return 1.0
    divisor = {"mean": values.mean, "max": values.max, "sum": values.sum}[normalize]()
    return float(divisor) if divisor > 0 else 1.0  # all zeros: nothing to rescale


def solve(problem: SearchProblem, normalize: str = "mean") -> tuple[dict[str, np.ndarray], dict]:
    """Run the search on a built problem; return (keep flags per kind, diagnostics incl. the threshold)."""
    kinds = [kind for kind in KINDS if kind in problem.units]
    for kind in kinds:
        units = problem.units[kind]
        if units.scores.size and units.scores.min() < 0:
            raise MaskError(f"search 'threshold' needs non-negative importance scores; {kind} scores have "
                            f"{units.scores.min():g}")
    normalised = np.concatenate([problem.units[k].scores / _divisor(problem.units[k].scores, normalize)
                                 for k in kinds])
    costs = np.concatenate([problem.units[k].costs for k in kinds])
    order = descending_order(normalised)
    cum_cost = np.cumsum(costs[order])
    kept_count = int(np.searchsorted(cum_cost, problem.available, side="right"))
    flags = np.zeros(len(normalised), dtype=bool)
    flags[order[:kept_count]] = True
    keep, start = {}, 0
    for kind in kinds:
        size = len(problem.units[kind].scores)
        keep[kind] = flags[start:start + size]
        start += size
    threshold = float(normalised[order[kept_count - 1]]) if kept_count else float("inf")
    info = {"threshold": threshold, "normalize": normalize, "kept_units": kept_count, "units": len(normalised),
            "kept_cost": problem.kept_cost(keep), "budget": problem.budget, "dense_cost": problem.dense_cost}
    return keep, info


@register_search("threshold")
def threshold_search(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]], constraint: float,
                     metric: str = "mac", *, normalize: str = "mean", report: dict | None = None,
                     ) -> dict[str, torch.Tensor]:
    """One global threshold over per-kind normalised scores (see the module docstring); binary float32 masks.

    ``normalize``: ``mean`` | ``max`` | ``sum`` | ``none`` (how each kind's scores are scaled first).
    ``report``, if given, is filled with the threshold, kept units and costs.
    """
    problem = build_problem(scores, views, constraint, metric)
    keep, info = solve(problem, normalize)
    if report is not None:
        report.update(info)
    return problem.masks(keep)
