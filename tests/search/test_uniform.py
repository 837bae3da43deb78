"""The uniform baseline: same share per layer, global top-up, budget."""
import math

import pytest
import torch

from clipprune import flops
from clipprune.search import get_search, uniform_search

from . import ONE_TOWER, TWO_TOWERS, assert_within_budget, random_scores, tower


@pytest.mark.parametrize("metric", ["mac", "params"])
@pytest.mark.parametrize("views", [ONE_TOWER, TWO_TOWERS], ids=["one_tower", "two_towers"])
def test_never_over_budget_and_misses_by_less_than_a_neuron(views, metric):
    generator = torch.Generator().manual_seed(21)
    for draw in range(100):
        scores = random_scores(views, generator, ("uniform", "heavy", "ties", "sparse")[draw % 4])
        constraint = float(torch.rand((), generator=generator)) * 0.98 + 0.02
        masks = uniform_search(scores, views, constraint, metric)
        assert set(masks) == set(scores)
        assert_within_budget(masks, views, constraint, metric)


def test_hand_computed_counts():
    views = {"vision": tower(2, 3, 4, 8, 16, 5)}
    head_cost, neuron_cost = flops.unit_costs(views["vision"][0])
    assert (head_cost, neuron_cost) == (840, 80)
    # per layer: target 0.5 · (3·840 + 16·80) = 1900; 1 head (840) leaves 1060 → 13 neurons (1040);
    # 2 × 20 MACs left over is less than a neuron, so no top-up
    scores = random_scores(views, torch.Generator().manual_seed(22))
    masks = uniform_search(scores, views, 0.5)
    assert masks["vision.head"].sum(dim=1).tolist() == [1, 1]
    assert masks["vision.neuron"].sum(dim=1).tolist() == [13, 13]


@pytest.mark.parametrize("metric", ["mac", "params"])
def test_same_share_in_every_layer(metric):
    views = {"vision": tower(6, 8, 8, 32, 64, 17)}
    layers = len(views["vision"])
    head_cost, neuron_cost = flops.unit_costs(views["vision"][0], metric)
    layer_cost = 8 * head_cost + 64 * neuron_cost
    generator = torch.Generator().manual_seed(23)
    for constraint in (0.1, 0.25, 0.5, 0.77, 0.9):
        scores = random_scores(views, generator, "heavy")
        masks = uniform_search(scores, views, constraint, metric)
        heads = masks["vision.head"].sum(dim=1)
        neurons = masks["vision.neuron"].sum(dim=1)
        assert heads.eq(math.floor(constraint * 8)).all()
        base = min(64, math.floor((constraint * layer_cost - heads[0].item() * head_cost) / neuron_cost))
        assert neurons.ge(base).all()
        assert (neurons - base).sum() < layers  # the top-up adds less than one neuron per layer in all
        fractions = (heads * head_cost + neurons * neuron_cost) / layer_cost
        assert (fractions - constraint).abs().max() <= layers * neuron_cost / layer_cost


def test_keeps_the_best_units_of_each_layer():
    views = TWO_TOWERS
    scores = random_scores(views, torch.Generator().manual_seed(24), "heavy")
    masks = uniform_search(scores, views, 0.45)
    for key, mask in masks.items():
        for layer in range(mask.shape[0]):
            kept, dropped = scores[key][layer][mask[layer] == 1], scores[key][layer][mask[layer] == 0]
            if len(kept) and len(dropped):
                assert kept.min() >= dropped.max()


def test_constraint_one_keeps_everything_and_is_deterministic():
    scores = random_scores(TWO_TOWERS, torch.Generator().manual_seed(25), "ties")
    assert all(bool((m == 1).all()) for m in uniform_search(scores, TWO_TOWERS, 1.0).values())
    first = get_search("uniform")(scores, TWO_TOWERS, 0.33, "params")
    second = get_search("uniform")({k: v.clone() for k, v in reversed(list(scores.items()))}, TWO_TOWERS, 0.33, "params")
    for key in first:
        assert first[key].numpy().tobytes() == second[key].numpy().tobytes()


def test_signed_scores_and_neuron_only_scores():
    views = TWO_TOWERS
    scores = {k: v - 0.5 for k, v in random_scores(views, torch.Generator().manual_seed(26)).items()}
    assert_within_budget(uniform_search(scores, views, 0.6), views, 0.6, "mac")
    neuron_only = {"vision.neuron": scores["vision.neuron"], "text.neuron": scores["text.neuron"]}
    dense = flops.prunable_macs(views)
    masks = uniform_search(neuron_only, views, 0.8)
    kept = flops.masked_macs(views, masks)  # heads stay and are paid for
    assert kept <= 0.8 * dense
    assert math.floor(0.8 * dense) - kept < min(flops.neuron_macs(t[0]) for t in views.values())


def test_head_only_scores_top_up_with_heads():
    views = TWO_TOWERS
    scores = random_scores(views, torch.Generator().manual_seed(27))
    head_only = {"vision.head": scores["vision.head"], "text.head": scores["text.head"]}
    dense = flops.prunable_macs(views)
    for constraint in (0.75, 0.9):
        masks = uniform_search(head_only, views, constraint)
        assert set(masks) == {"vision.head", "text.head"}
        kept = flops.masked_macs(views, masks)
        assert kept <= constraint * dense
        unkept = [flops.head_macs(v[l]) for name, v in views.items() for l in range(len(v))
                  if bool((masks[f"{name}.head"][l] == 0).any())]
        assert math.floor(constraint * dense) - kept < min(unkept, default=math.inf)
