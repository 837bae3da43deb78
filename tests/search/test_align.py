"""search.align: kept neurons rounded to multiples of N without breaking the search's budget."""
import itertools
import math

import numpy as np
import pytest
import torch

from clipprune import flops
from clipprune.search import mac_search
from clipprune.search.align import align_neurons, aligned_counts

from . import ONE_TOWER, TWO_TOWERS, random_scores


@pytest.mark.parametrize("draw", range(40))
def test_aligned_counts_against_brute_force(draw):
    rng = np.random.default_rng(draw)
    layers, align = int(rng.integers(1, 5)), int(rng.choice([2, 3, 4, 8]))
    widths = [int(w) for w in rng.integers(1, 20, layers)]
    counts = [int(rng.integers(0, w + 1)) for w in widths]
    unit = [int(c) for c in rng.integers(1, 6, layers)]
    offset = [int(c) for c in rng.integers(0, 4, layers)]
    costs = [lambda n, u=u, o=o: 0 if n == 0 else o + u * n for u, o in zip(unit, offset)]  # non-decreasing
    gains = [np.sort(rng.random(w))[::-1] for w in widths]
    used = sum(cost(n) for cost, n in zip(costs, counts))
    slack = int(rng.integers(0, 12))
    budget = used + slack
    new = aligned_counts(counts, widths, gains, costs, slack, align)

    def options(n, width):  # the rounded-down and rounded-up widths
        if n % align == 0 or n == width:
            return [n]
        down = (n // align) * align
        return [down, min(down + align, width)]

    choices = [options(n, w) for n, w in zip(counts, widths)]
    assert all(c in opts for c, opts in zip(new, choices))
    assert sum(cost(n) for cost, n in zip(costs, new)) <= budget  # never over budget
    # maximal: no layer left rounded down could still be rounded up within the budget
    left = budget - sum(cost(n) for cost, n in zip(costs, new))
    for layer, (c, opts) in enumerate(zip(new, choices)):
        if c == opts[0] and len(opts) == 2:
            assert costs[layer](opts[1]) - costs[layer](c) > left
    # and some feasible rounding always exists (all down), so brute force agrees the budget can be met
    assert min(sum(cost(n) for cost, n in zip(costs, combo)) for combo in itertools.product(*choices)) <= budget


@pytest.mark.parametrize("views", [ONE_TOWER, TWO_TOWERS], ids=["one_tower", "two_towers"])
@pytest.mark.parametrize("metric", ["mac", "params"])
def test_the_aligned_search_keeps_its_budget(views, metric):
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        scores = random_scores(views, gen)
        constraint = float(torch.rand((), generator=gen)) * 0.8 + 0.1
        masks = mac_search(scores, views, constraint, metric)

        def cost(tower, layer, kind, count):
            head_cost, neuron_cost = flops.unit_costs(views[tower][layer], metric)
            return count * (head_cost if kind == "head" else neuron_cost)

        budget = math.floor(constraint * flops.prunable_macs(views, metric))
        aligned = align_neurons(masks, scores, views, 8, cost, budget)
        assert flops.masked_macs(views, aligned, metric) <= budget
        for tower_name, blocks in views.items():
            key = f"{tower_name}.neuron"
            assert torch.equal(aligned[f"{tower_name}.head"], masks[f"{tower_name}.head"])
            for layer, view in enumerate(blocks):
                kept = int((aligned[key][layer] != 0).sum())
                assert kept % 8 == 0 or kept == view.ffn_dim
                row, kept_row = scores[key][layer].numpy(), (aligned[key][layer] != 0).numpy()
                assert row[kept_row].min(initial=np.inf) >= row[~kept_row].max(initial=-np.inf)  # the best ones
        assert align_neurons(masks, scores, views, 1, cost, budget) == masks  # align 1: unchanged
