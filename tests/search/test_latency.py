"""Latency-constrained search: the piecewise-linear fit, the budget, optimality against brute force."""
import itertools

import numpy as np
import pytest
import torch

from clipprune.errors import MaskError, ParamError
from clipprune.search.latency import (PiecewiseLinear, TowerLatency, fit_piecewise, latency_search,
                                      predicted_fraction, tower_latencies)

from . import tower

VIEWS = {"vision": tower(2, 4, 8, 32, 6, 17)}


def test_the_fit_recovers_a_piecewise_linear_curve_exactly():
    truth = PiecewiseLinear(threshold=3, c=2.0e-3, slope=5.0e-4)
    widths = list(range(1, 13))
    fit = fit_piecewise(widths, [truth(w) for w in widths])
    assert fit.threshold == 3
    assert fit.c == pytest.approx(truth.c) and fit.slope == pytest.approx(truth.slope)
    flat = fit_piecewise([1, 2, 3], [1.0, 1.0, 1.0])  # no growth: one constant, slope 0
    assert (flat.c, flat.slope) == (1.0, 0.0)
    assert flat(0) == 0.0  # a dropped sub-block costs nothing
    decreasing = fit_piecewise([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])
    assert decreasing.slope == 0.0  # never a negative slope (cost must not fall with width)
    with pytest.raises(MaskError):
        fit_piecewise([0, 1], [1.0, 2.0])


def _table(seconds_per_head=4e-4, head_c=1e-3, head_t=1, neuron_c=3e-4, neuron_t=2, slope_n=1e-4):
    """A synthetic table whose curves are exactly piecewise linear (what the fit must recover)."""
    heads = PiecewiseLinear(head_t, head_c, seconds_per_head)
    neurons = PiecewiseLinear(neuron_t, neuron_c, slope_n)
    dense = 2.0e-3 + 2 * (heads(4) + neurons(6))
    return {"towers": {"vision": {
        "layers": 2, "num_heads": 4, "ffn_dim": 6, "dense_seconds": dense,
        "attention": {"widths": [1, 2, 3, 4], "seconds": [heads(w) for w in (1, 2, 3, 4)]},
        "mlp": {"widths": list(range(1, 7)), "seconds": [neurons(w) for w in range(1, 7)]}}}}


def _brute_force(scores, model: TowerLatency, limit: float) -> float:
    """Best summed score over every per-layer count at or above the thresholds (top units of each layer)."""
    head_rows = [np.sort(scores["vision.head"][layer].numpy())[::-1] for layer in range(2)]
    neuron_rows = [np.sort(scores["vision.neuron"][layer].numpy())[::-1] for layer in range(2)]
    best = -1.0
    head_range = range(model.attention.threshold, 5)
    neuron_range = range(model.mlp.threshold, 7)
    for h0, h1, n0, n1 in itertools.product(head_range, head_range, neuron_range, neuron_range):
        if model.predict([h0, h1], [n0, n1]) > limit + 1e-15:
            continue
        value = (head_rows[0][:h0].sum() + head_rows[1][:h1].sum() + neuron_rows[0][:n0].sum()
                 + neuron_rows[1][:n1].sum())
        best = max(best, value)
    return best


@pytest.mark.parametrize("draw", range(12))
def test_the_search_is_within_budget_and_optimal_against_brute_force(draw):
    gen = torch.Generator().manual_seed(draw)
    table = _table(seconds_per_head=float(torch.rand((), generator=gen)) * 1e-3 + 1e-4,
                   slope_n=float(torch.rand((), generator=gen)) * 3e-4 + 1e-5)
    models = tower_latencies(table)
    scores = {"vision.head": torch.rand(2, 4, generator=gen, dtype=torch.float64),
              "vision.neuron": torch.rand(2, 6, generator=gen, dtype=torch.float64) * 0.5}
    low = predicted_fraction({"vision.head": torch.tensor([[1., 0, 0, 0]] * 2),
                              "vision.neuron": torch.tensor([[1., 1, 0, 0, 0, 0]] * 2)}, models)
    constraint = low + (1 - low) * float(torch.rand((), generator=gen))
    masks = latency_search(scores, VIEWS, constraint, models)
    assert predicted_fraction(masks, models) <= constraint + 1e-12
    kept = sum(float(scores[k][masks[k] != 0].sum()) for k in scores)
    limit = constraint * models["vision"].dense_seconds
    assert kept == pytest.approx(_brute_force(scores, models["vision"], limit), rel=1e-9)
    # every layer keeps at least the fitted thresholds' units, the best-scored ones of the layer
    for key, threshold in (("vision.head", 1), ("vision.neuron", 2)):
        for layer in range(2):
            row, kept_row = scores[key][layer].numpy(), (masks[key][layer] != 0).numpy()
            assert int(kept_row.sum()) >= threshold
            assert row[kept_row].min() >= row[~kept_row].max(initial=-1)


def test_a_constraint_below_the_thresholds_is_one_line_and_scores_must_cover_both_kinds():
    models = tower_latencies(_table())
    scores = {"vision.head": torch.rand(2, 4), "vision.neuron": torch.rand(2, 6)}
    with pytest.raises(ParamError, match=r"^search\.constraint must be >= 0\.\d+ for this latency table"):
        latency_search(scores, VIEWS, 0.05, models)
    with pytest.raises(MaskError, match="needs neuron scores of the vision tower"):
        latency_search({"vision.head": scores["vision.head"]}, VIEWS, 0.9, models)
    with pytest.raises(MaskError, match="does not match the model's"):
        latency_search({"vision.head": torch.rand(3, 4), "vision.neuron": torch.rand(3, 6)},
                       {"vision": tower(3, 4, 8, 32, 6, 17)}, 0.9, models)


def test_block_curves_are_scaled_to_the_measured_tower():
    table = _table()
    entry = table["towers"]["vision"]
    entry["skeleton_seconds"] = 1.0e-3
    entry["dense_seconds"] *= 1.5  # blocks run slower inside the tower than alone
    model = tower_latencies(table)["vision"]
    assert model.overhead == pytest.approx(1.0e-3)  # the measured skeleton
    assert model.predict([4, 4], [6, 6]) == pytest.approx(entry["dense_seconds"])
