"""LFPR's param_sum search: a kept-parameters budget, Kwon's solver, exact on tiny problems, deterministic."""
import math

import numpy as np
import pytest
import torch

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.search import get_search, mac_search
from clipprune.search.param_sum import param_sum_search

from . import ONE_TOWER, TWO_TOWERS, assert_within_budget, kept_score, random_scores, tower

KINDS = ("uniform", "heavy", "ties", "sparse")
TINY_ONE = {"vision": tower(2, 3, 4, 8, 4, 5)}  # 2 layers × 3 heads, ffn 4: 14 units


def exhaustive_optimum(scores, views, constraint, metric):
    """Best summed score over every subset of heads and neurons that fits the budget."""
    units = []
    for name, blocks in views.items():
        for layer, view in enumerate(blocks):
            head_cost, neuron_cost = flops.unit_costs(view, metric)
            units += [(float(scores[f"{name}.head"][layer, j]), head_cost) for j in range(view.num_heads)]
            units += [(float(scores[f"{name}.neuron"][layer, j]), neuron_cost) for j in range(view.ffn_dim)]
    score = np.array([s for s, _ in units])
    cost = np.array([c for _, c in units], dtype=np.int64)
    chosen = (np.arange(2 ** len(units))[:, None] >> np.arange(len(units))) & 1
    budget = math.floor(constraint * flops.prunable_macs(views, metric))
    return float((chosen[chosen @ cost <= budget] @ score).max())


@pytest.mark.parametrize("views", [ONE_TOWER, TWO_TOWERS], ids=["one_tower", "two_towers"])
def test_never_over_the_params_budget_and_misses_by_less_than_a_neuron(views):
    generator = torch.Generator().manual_seed(11)
    for draw in range(80):
        scores = random_scores(views, generator, KINDS[draw % 4])
        constraint = float(torch.rand((), generator=generator)) * 0.98 + 0.02
        masks = param_sum_search(scores, views, constraint)
        assert set(masks) == set(scores)
        assert_within_budget(masks, views, constraint, "params")


def test_head_and_neuron_cost_their_weights_with_biases():
    view = ONE_TOWER["vision"][0]
    d, dh = view.hidden, view.head_dim
    assert flops.unit_costs(view, "params") == (3 * (d * dh + dh) + dh * d, d + 1 + d)


def test_single_tower_is_the_exact_optimum_under_a_params_budget():
    generator = torch.Generator().manual_seed(12)
    for draw in range(20):
        scores = random_scores(TINY_ONE, generator, KINDS[draw % 4])
        constraint = float(torch.rand((), generator=generator)) * 0.95 + 0.05
        masks = param_sum_search(scores, TINY_ONE, constraint)
        assert kept_score(masks, scores) == pytest.approx(exhaustive_optimum(scores, TINY_ONE, constraint, "params"),
                                                          rel=1e-9, abs=1e-12)
        assert_within_budget(masks, TINY_ONE, constraint, "params")


def test_budget_in_params_differs_from_macs():
    # many tokens make a head dear in MACs (2·s²·dh) but not in parameters: the two budgets choose differently
    views = {"vision": tower(2, 4, 8, 32, 64, 200)}
    head_params, neuron_params = flops.unit_costs(views["vision"][0], "params")
    head_macs, neuron_macs = flops.unit_costs(views["vision"][0], "mac")
    assert head_macs / neuron_macs > 2 * head_params / neuron_params
    scores = random_scores(views, torch.Generator().manual_seed(3), "uniform")
    by_params = param_sum_search(scores, views, 0.5)
    by_macs = param_sum_search(scores, views, 0.5, "mac")
    assert flops.kept_fraction(views, by_params, "params") <= 0.5
    assert flops.kept_fraction(views, by_macs, "mac") <= 0.5
    assert not all(torch.equal(by_params[k], by_macs[k]) for k in scores)


@pytest.mark.parametrize("metric", ["params", "mac"])
def test_is_kwons_search_under_the_chosen_metric_and_registered(metric):
    generator = torch.Generator().manual_seed(4)
    registered = get_search("param_sum")
    assert registered.registered_name == "param_sum" and registered.options == ("normalize",)
    for draw in range(12):
        scores = random_scores(TWO_TOWERS, generator, KINDS[draw % 4])
        for normalize in ("none", "layer"):
            expected = mac_search(scores, TWO_TOWERS, 0.37, metric, normalize=normalize)
            found = registered(scores, TWO_TOWERS, 0.37, metric, normalize=normalize)
            assert all(torch.equal(found[k], expected[k]) for k in expected)
    direct = param_sum_search(scores, TWO_TOWERS, 0.37)  # called directly, the metric defaults to params
    assert all(torch.equal(direct[k], mac_search(scores, TWO_TOWERS, 0.37, "params")[k]) for k in scores)
    assert not all(torch.equal(direct[k], mac_search(scores, TWO_TOWERS, 0.37, "mac")[k]) for k in scores)


def test_deterministic_and_independent_of_dict_order():
    scores = random_scores(TWO_TOWERS, torch.Generator().manual_seed(5), "ties")
    first = param_sum_search(scores, TWO_TOWERS, 0.42)
    again = param_sum_search(dict(reversed(list(scores.items()))), TWO_TOWERS, 0.42)
    assert all(torch.equal(first[k], again[k]) for k in scores)


def test_bad_inputs_name_the_key():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(6), "uniform")
    search = get_search("param_sum")
    cases = [
        (dict(fill=True), ParamError, r"^search.options: unknown option\(s\) fill for method 'param_sum'"),
    ]
    for kwargs, error, message in cases:
        args = {"constraint": 0.5, "metric": "params", **kwargs}
        with pytest.raises(error, match=message) as info:
            search(scores, ONE_TOWER, args.pop("constraint"), args.pop("metric"), **args)
        assert "\n" not in str(info.value)
    negative = dict(scores)
    negative["vision.neuron"] = negative["vision.neuron"] - 1.0
    with pytest.raises(MaskError, match=r"^search 'param_sum' needs non-negative importance scores; vision.neuron"):
        search(negative, ONE_TOWER, 0.5, "params")


def test_report_holds_the_head_count():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(7), "uniform")
    report = {}
    masks = get_search("param_sum")(scores, ONE_TOWER, 0.5, "params", report=report)
    assert report["head_count"] == int(masks["vision.head"].sum()) and report["metric"] == "params"
    assert report["kept_cost"] == flops.masked_macs(ONE_TOWER, masks, "params") <= report["budget"]
    assert report["objective"] == pytest.approx(kept_score(masks, scores))
