"""Kwon et al.'s search: budget, optimality against brute force, determinism, edge cases."""
import itertools
import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.search import mac_search

from . import ONE_TOWER, TWO_TOWERS, assert_within_budget, kept_score, random_scores, tower


# ---------------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["mac", "params"])
@pytest.mark.parametrize("views", [ONE_TOWER, TWO_TOWERS], ids=["one_tower", "two_towers"])
def test_never_over_budget_and_misses_by_less_than_a_neuron(views, metric):
    generator = torch.Generator().manual_seed(1)
    for draw in range(120):
        kind = ("uniform", "heavy", "ties", "sparse")[draw % 4]
        scores = random_scores(views, generator, kind)
        constraint = float(torch.rand((), generator=generator)) * 0.98 + 0.02
        masks = mac_search(scores, views, constraint, metric)
        assert set(masks) == set(scores)
        assert all(masks[k].shape == scores[k].shape for k in scores)
        assert_within_budget(masks, views, constraint, metric)


# ---------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------
def unit_table(scores, views, metric):
    """Flat lists (score, cost, key, layer, index) of heads and of neurons, towers in sorted order."""
    heads, neurons = [], []
    for name in sorted(views):
        for layer, view in enumerate(views[name]):
            head_cost, neuron_cost = flops.unit_costs(view, metric)
            heads += [(float(scores[f"{name}.head"][layer, j]), head_cost) for j in range(view.num_heads)]
            neurons += [(float(scores[f"{name}.neuron"][layer, j]), neuron_cost) for j in range(view.ffn_dim)]
    return heads, neurons


def greedy_neurons(neurons, budget):
    """Plain-loop greedy fill: best score first (index order on ties), keep whatever still fits."""
    total = 0.0
    for score, cost in sorted(neurons, key=lambda unit: -unit[0]):  # sorted() is stable
        if cost <= budget:
            budget -= cost
            total += score
    return total


def brute_force_top_h(scores, views, constraint, metric):
    """max over h of (top-h heads + greedy neuron fill): the space Kwon's search covers."""
    heads, neurons = unit_table(scores, views, metric)
    budget = math.floor(constraint * flops.prunable_macs(views, metric))
    ranked = sorted(heads, key=lambda unit: -unit[0])
    best = -math.inf
    for h in range(len(ranked) + 1):
        cost = sum(c for _, c in ranked[:h])
        if cost <= budget:
            best = max(best, sum(s for s, _ in ranked[:h]) + greedy_neurons(neurons, budget - cost))
    return best


def brute_force_head_subsets(scores, views, constraint, metric):
    """max over every subset of heads of (subset + greedy neuron fill)."""
    heads, neurons = unit_table(scores, views, metric)
    budget = math.floor(constraint * flops.prunable_macs(views, metric))
    best = -math.inf
    for chosen in itertools.product((0, 1), repeat=len(heads)):
        cost = sum(c for take, (_, c) in zip(chosen, heads) if take)
        if cost <= budget:
            score = sum(s for take, (s, _) in zip(chosen, heads) if take)
            best = max(best, score + greedy_neurons(neurons, budget - cost))
    return best


def exact_optimum(scores, views, constraint, metric):
    """max summed score over every subset of all heads and neurons within budget (vectorised enumeration)."""
    heads, neurons = unit_table(scores, views, metric)
    units = heads + neurons
    score = np.array([s for s, _ in units])
    cost = np.array([c for _, c in units], dtype=np.int64)
    chosen = (np.arange(2 ** len(units))[:, None] >> np.arange(len(units))) & 1
    budget = math.floor(constraint * flops.prunable_macs(views, metric))
    feasible = chosen @ cost <= budget
    return float((chosen[feasible] @ score).max())


TINY_ONE = {"vision": tower(2, 3, 4, 8, 4, 5)}  # 2 layers × 3 heads, ffn 4
TINY_TWO = {"vision": tower(2, 2, 4, 8, 3, 5), "text": tower(1, 2, 2, 6, 4, 3)}


@pytest.mark.parametrize("metric", ["mac", "params"])
def test_single_tower_is_exactly_optimal(metric):
    generator = torch.Generator().manual_seed(2)
    for draw in range(25):
        scores = random_scores(TINY_ONE, generator, ("uniform", "heavy", "ties", "sparse")[draw % 4])
        constraint = float(torch.rand((), generator=generator))
        masks = mac_search(scores, TINY_ONE, constraint, metric)
        found = kept_score(masks, scores)
        # one head cost and one neuron cost: top-h heads + top neurons covers the optimum
        assert found == pytest.approx(exact_optimum(scores, TINY_ONE, constraint, metric), rel=1e-9, abs=1e-12)
        assert found == pytest.approx(brute_force_head_subsets(scores, TINY_ONE, constraint, metric), rel=1e-9, abs=1e-12)
        assert_within_budget(masks, TINY_ONE, constraint, metric)


@pytest.mark.parametrize("metric", ["mac", "params"])
def test_two_towers_match_brute_force_in_kwon_space(metric):
    generator = torch.Generator().manual_seed(3)
    costs = {name: flops.unit_costs(v[0], metric) for name, v in TINY_TWO.items()}
    assert costs["vision"] != costs["text"]  # the case where prefix fill and greedy fill differ
    for draw in range(40):
        scores = random_scores(TINY_TWO, generator, ("uniform", "heavy", "ties", "sparse")[draw % 4])
        constraint = float(torch.rand((), generator=generator)) * 0.9 + 0.05
        masks = mac_search(scores, TINY_TWO, constraint, metric)
        found = kept_score(masks, scores)
        assert found == pytest.approx(brute_force_top_h(scores, TINY_TWO, constraint, metric), rel=1e-9, abs=1e-12)
        # any head subset can only do as well or better; the exact optimum bounds everything
        assert found <= brute_force_head_subsets(scores, TINY_TWO, constraint, metric) + 1e-9
        assert found <= exact_optimum(scores, TINY_TWO, constraint, metric) + 1e-9
        assert_within_budget(masks, TINY_TWO, constraint, metric)


def test_trades_heads_for_neurons_by_score():
    views = {"vision": tower(1, 2, 4, 8, 4, 5)}
    head_cost, neuron_cost = flops.unit_costs(views["vision"][0], "mac")
    dense = 2 * head_cost + 4 * neuron_cost
    constraint = (2 * head_cost + 0.5) / dense  # room for two heads, or for one head and all four neurons
    assert head_cost + 4 * neuron_cost <= 2 * head_cost <= constraint * dense < 2 * head_cost + neuron_cost
    strong_neurons = {"vision.head": torch.tensor([[1.0, 0.5]]), "vision.neuron": torch.full((1, 4), 0.2)}
    masks = mac_search(strong_neurons, views, constraint)
    assert masks["vision.head"].tolist() == [[1.0, 0.0]] and masks["vision.neuron"].sum() == 4
    weak_neurons = {"vision.head": torch.tensor([[1.0, 0.9]]), "vision.neuron": torch.full((1, 4), 0.01)}
    masks = mac_search(weak_neurons, views, constraint)
    assert masks["vision.head"].tolist() == [[1.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# edge cases and determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["mac", "params"])
def test_constraint_one_keeps_everything(metric):
    scores = random_scores(TWO_TOWERS, torch.Generator().manual_seed(4), "sparse")
    masks = mac_search(scores, TWO_TOWERS, 1.0, metric)
    assert all(bool((mask == 1).all()) for mask in masks.values())


def test_identical_scores_give_bit_identical_masks():
    scores = random_scores(TWO_TOWERS, torch.Generator().manual_seed(5), "ties")
    first = mac_search(scores, TWO_TOWERS, 0.37)
    again = mac_search({k: v.clone() for k, v in scores.items()}, TWO_TOWERS, 0.37)
    reordered = mac_search(dict(reversed(list(scores.items()))), TWO_TOWERS, 0.37)
    as_float32 = mac_search({k: v.float() for k, v in scores.items()}, TWO_TOWERS, 0.37)  # values exact in both
    for other in (again, reordered, as_float32):
        assert set(other) == set(first)
        for key in first:
            assert first[key].numpy().tobytes() == other[key].numpy().tobytes()


def test_all_equal_scores_break_ties_by_index():
    views = ONE_TOWER
    scores = {"vision.head": torch.ones(3, 4), "vision.neuron": torch.ones(3, 64)}
    masks = mac_search(scores, views, 0.5)
    for key in masks:
        flat = masks[key].flatten()
        kept = int(flat.sum())
        assert flat[:kept].eq(1).all() and flat[kept:].eq(0).all()  # a prefix in (layer, index) order
    # with all scores zero the search still spends the budget
    zero = mac_search({k: torch.zeros_like(v) for k, v in scores.items()}, views, 0.5)
    assert_within_budget(zero, views, 0.5, "mac")


def test_negative_scores_are_rejected():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(6))
    scores["vision.neuron"][1, 3] = -0.25
    with pytest.raises(MaskError, match=r"non-negative importance scores; vision.neuron has -0.25"):
        mac_search(scores, ONE_TOWER, 0.5)


def test_neuron_scores_only_keep_heads_and_charge_them():
    views = TWO_TOWERS
    scores = random_scores(views, torch.Generator().manual_seed(7))
    neuron_only = {"vision.neuron": scores["vision.neuron"], "text.neuron": scores["text.neuron"]}
    dense = flops.prunable_macs(views)
    heads_cost = sum(v.num_heads * flops.head_macs(v) for t in views.values() for v in t)
    constraint = (heads_cost + 0.3 * (dense - heads_cost)) / dense
    masks = mac_search(neuron_only, views, constraint)
    assert set(masks) == {"vision.neuron", "text.neuron"}
    kept = flops.masked_macs(views, masks)  # missing head masks count as dense
    assert kept <= constraint * dense
    assert math.floor(constraint * dense) - kept < min(flops.neuron_macs(t[0]) for t in views.values())
    with pytest.raises(ParamError, match=r"search.constraint 0.1 allows .* the units without scores "
                                         r"\(text.head, vision.head\) alone cost"):
        mac_search(neuron_only, views, 0.1)


def test_head_scores_only_fill_heads_greedily():
    views = TWO_TOWERS
    scores = random_scores(views, torch.Generator().manual_seed(8))
    head_only = {"vision.head": scores["vision.head"], "text.head": scores["text.head"]}
    masks = mac_search(head_only, views, 0.8)
    kept = flops.masked_macs(views, masks)
    dense = flops.prunable_macs(views)
    assert kept <= 0.8 * dense
    unkept = [flops.head_macs(v[l]) for name, v in views.items() for l in range(len(v))
              if bool((masks[f"{name}.head"][l] == 0).any())]
    assert math.floor(0.8 * dense) - kept < min(unkept)


def test_only_searched_towers_count_in_the_budget():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(9))
    masks = mac_search(scores, TWO_TOWERS, 0.5)  # text tower not scored: not searched, not budgeted
    assert set(masks) == {"vision.head", "vision.neuron"}
    assert_within_budget(masks, ONE_TOWER, 0.5, "mac")


def test_padded_scores_for_blocks_of_different_widths():
    # an already pruned tower: widths differ per block, tensors are padded to the widest (models.masks format)
    views = {"vision": [tower(1, 4, 8, 32, 64, 17)[0], replace(tower(1, 2, 8, 32, 40, 17)[0], index=1)]}
    scores = {"vision.head": torch.rand(2, 4, generator=torch.Generator().manual_seed(10)),
              "vision.neuron": torch.rand(2, 64, generator=torch.Generator().manual_seed(11))}
    scores["vision.head"][1, 2:] = float("nan")  # padding is ignored
    masks = mac_search(scores, views, 0.3)
    assert masks["vision.head"][1, 2:].eq(0).all() and masks["vision.neuron"][1, 40:].eq(0).all()
    rows = {"vision.head": [masks["vision.head"][i, :v.num_heads] for i, v in enumerate(views["vision"])],
            "vision.neuron": [masks["vision.neuron"][i, :v.ffn_dim] for i, v in enumerate(views["vision"])]}
    dense = flops.prunable_macs(views)
    kept = flops.masked_macs(views, rows)
    assert kept <= 0.3 * dense
    assert sum(int(r.sum()) for r in rows["vision.neuron"]) < 104  # some neuron dropped: the bound applies
    assert math.floor(0.3 * dense) - kept < flops.neuron_macs(views["vision"][0])


def test_layer_normalisation_is_scale_invariant_per_layer():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(12))
    scaled = {k: v.clone() for k, v in scores.items()}
    scaled["vision.head"][0] *= 1000.0  # one layer's heads look far more important in raw units
    raw = mac_search(scaled, ONE_TOWER, 0.4)
    assert raw["vision.head"][0].sum() == 4  # raw scores: that layer keeps every head
    normalised = mac_search(scaled, ONE_TOWER, 0.4, normalize="layer")
    reference = mac_search(scores, ONE_TOWER, 0.4, normalize="layer")
    for key in normalised:
        assert torch.equal(normalised[key], reference[key])
    assert_within_budget(normalised, ONE_TOWER, 0.4, "mac")


def test_vit_b32_sized_search_is_fast():
    views = {"vision": tower(12, 12, 64, 768, 3072, 50), "text": tower(12, 8, 64, 512, 2048, 77)}
    generator = torch.Generator().manual_seed(13)
    scores = random_scores(views, generator, "heavy")
    start = time.perf_counter()
    masks = mac_search(scores, views, 0.5)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert_within_budget(masks, views, 0.5, "mac")
    kept_heads = int(masks["vision.head"].sum() + masks["text.head"].sum())
    assert 0 < kept_heads < 12 * 12 + 12 * 8
