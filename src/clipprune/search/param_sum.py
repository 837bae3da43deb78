"""LFPR's "sum" search: Kwon's best-head-count search with a budget of kept parameters.

LFPR ranks heads and neurons by importance, and for every head count keeps the best heads, spends the rest
of the budget on the best neurons, and keeps the head count whose kept units have the largest summed
importance — Kwon's search (``search/mac.py``) with one change: a unit costs its weights, not its MACs. A
head owns its q, k, v rows with biases and its out-projection columns (``4·d·dh + 3·dh``), a neuron its fc1
row, fc1 bias and fc2 column (``2·d + 1``), as ``flops.unit_costs(view, "params")`` counts them.

So this *is* ``mac_search``'s solver; only the default metric differs. ``search.metric`` is honoured: the
search stage always passes it, so set ``search.metric: params`` for LFPR's budget (``mac`` gives Kwon's
search under LFPR's name). Called directly, ``param_sum_search`` defaults to ``"params"``; the registered
callable (``get_search("param_sum")``) follows the registry's contract, where an omitted metric is ``"mac"``. Properties are those of ``mac``: never over ``floor(constraint × prunable params)``,
what is left is smaller than the cost of every neuron not kept, optimal among "top-h heads + greedy
neurons" choices (the exact optimum for one tower), deterministic.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from clipprune.errors import MaskError
from clipprune.models.base import BlockView

from . import mac
from .common import build_problem
from .registry import register_search


def param_sum_search(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]], constraint: float,
                     metric: str = "params", *, normalize: str = "none", report: dict | None = None,
                     ) -> dict[str, torch.Tensor]:
    """LFPR's sum search (see the module docstring); binary float32 masks keyed like ``scores``.

    ``metric``: "params" (LFPR, the default when called directly) or "mac". ``normalize="layer"`` scales
    each layer's head and neuron scores to unit L2 norm before ranking, as for ``mac``. ``report``, if given,
    is filled with the chosen head count, the summed score and the kept / budget / dense costs.
    """
    problem = build_problem(scores, views, constraint, metric, normalize)
    try:
        mac._require_nonnegative(problem)
    except MaskError as err:  # same check, but name the method the user chose
        raise MaskError(str(err).replace("search 'mac'", "search 'param_sum'")) from None
    keep, info = mac.solve(problem)
    if report is not None:
        report.update(info, metric=metric)
    return problem.masks(keep)


# The registry's callable follows the registry contract (metric passed by the caller, "mac" if omitted);
# the module-level function above keeps LFPR's default metric "params" for direct calls.
register_search("param_sum")(param_sum_search)
