"""The global-threshold search: budget, the threshold property, brute force, normalisation, determinism."""
import math

import pytest
import torch

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.search import get_search
from clipprune.search.threshold import threshold_search

from . import ONE_TOWER, TWO_TOWERS, random_scores, tower

KINDS = ("uniform", "heavy", "ties", "sparse")
NORMALIZATIONS = ("mean", "max", "sum", "none")


def normalised_units(scores, views, metric, normalize):
    """[(normalised score, cost, key, layer, index)] of every unit, each kind scaled as documented."""
    units = {"head": [], "neuron": []}
    for name in sorted(views):
        for layer, view in enumerate(views[name]):
            head_cost, neuron_cost = flops.unit_costs(view, metric)
            for kind, width, cost in (("head", view.num_heads, head_cost), ("neuron", view.ffn_dim, neuron_cost)):
                units[kind] += [[float(scores[f"{name}.{kind}"][layer, j]), cost, f"{name}.{kind}", layer, j]
                                for j in range(width)]
    for kind, rows in units.items():
        values = [row[0] for row in rows]
        divisor = {"mean": sum(values) / len(values), "max": max(values), "sum": sum(values), "none": 1.0}[normalize]
        for row in rows:
            row[0] = row[0] / divisor if divisor > 0 else row[0]
    return units["head"] + units["neuron"]


def is_kept(masks, unit):
    return bool(masks[unit[2]][unit[3], unit[4]] != 0)


def check_threshold_masks(masks, scores, views, constraint, metric, normalize):
    units = normalised_units(scores, views, metric, normalize)
    budget = math.floor(constraint * flops.prunable_macs(views, metric))
    kept = [u for u in units if is_kept(masks, u)]
    dropped = [u for u in units if not is_kept(masks, u)]
    kept_cost = flops.masked_macs(views, masks, metric)
    assert kept_cost == sum(u[1] for u in kept) <= budget
    if kept and dropped:  # one threshold: nothing dropped scores above anything kept
        assert min(u[0] for u in kept) >= max(u[0] for u in dropped)
    if dropped:  # the best unit left out did not fit: the miss is smaller than its cost
        best_dropped = max(dropped, key=lambda u: u[0])
        assert budget - kept_cost < best_dropped[1]
    for mask in masks.values():
        assert mask.dtype == torch.float32 and bool(((mask == 0) | (mask == 1)).all())
    return units, budget


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("metric", ["mac", "params"])
@pytest.mark.parametrize("views", [ONE_TOWER, TWO_TOWERS], ids=["one_tower", "two_towers"])
def test_budget_and_threshold_property(views, metric, normalize):
    generator = torch.Generator().manual_seed(21)
    for draw in range(30):
        scores = random_scores(views, generator, KINDS[draw % 4])
        constraint = float(torch.rand((), generator=generator)) * 0.98 + 0.02
        masks = threshold_search(scores, views, constraint, metric, normalize=normalize)
        assert set(masks) == set(scores)
        check_threshold_masks(masks, scores, views, constraint, metric, normalize)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_matches_brute_force_over_thresholds(normalize):
    """Without ties, the result is the lowest threshold t whose set {normalised score >= t} fits the budget."""
    views = {"vision": tower(2, 3, 4, 8, 5, 5), "text": tower(1, 2, 2, 6, 4, 3)}
    generator = torch.Generator().manual_seed(22)
    for _ in range(25):
        scores = random_scores(views, generator, "uniform")
        constraint = float(torch.rand((), generator=generator)) * 0.95 + 0.05
        masks = threshold_search(scores, views, constraint, "mac", normalize=normalize)
        units, budget = check_threshold_masks(masks, scores, views, constraint, "mac", normalize)
        best = None
        for t in sorted({u[0] for u in units}) + [math.inf]:
            if sum(u[1] for u in units if u[0] >= t) <= budget:
                best = t
                break
        assert {tuple(u[2:]) for u in units if u[0] >= best} == {tuple(u[2:]) for u in units if is_kept(masks, u)}


def test_normalisation_puts_heads_and_neurons_on_one_scale():
    views = ONE_TOWER
    scores = random_scores(views, torch.Generator().manual_seed(23), "uniform")
    rescaled = dict(scores, **{"vision.neuron": scores["vision.neuron"] * 1000.0})
    for normalize in ("mean", "max", "sum"):  # a per-kind scale factor cancels
        a = threshold_search(scores, views, 0.5, normalize=normalize)
        b = threshold_search(rescaled, views, 0.5, normalize=normalize)
        assert all(torch.equal(a[k], b[k]) for k in scores), normalize
    raw = threshold_search(rescaled, views, 0.5, normalize="none")
    # raw scores: neurons now outrank most heads, so heads go first
    assert raw["vision.head"].sum() < threshold_search(scores, views, 0.5, normalize="none")["vision.head"].sum()
    # sum-normalisation gives each of the 192 neurons a far smaller share than each of the 12 heads
    by_sum = threshold_search(scores, views, 0.5, normalize="sum")
    by_mean = threshold_search(scores, views, 0.5, normalize="mean")
    assert by_sum["vision.head"].sum() > by_mean["vision.head"].sum()


def test_a_head_that_does_not_fit_stops_the_threshold():
    """A pure threshold cannot skip the next (dear) head to keep cheaper, lower-scored neurons."""
    views = {"vision": tower(1, 2, 4, 8, 4, 5)}
    head_cost, neuron_cost = flops.unit_costs(views["vision"][0], "mac")
    dense = 2 * head_cost + 4 * neuron_cost
    constraint = (head_cost + 2 * neuron_cost) / dense
    scores = {"vision.head": torch.tensor([[4.0, 1.0]]), "vision.neuron": torch.tensor([[0.3, 0.2, 0.1, 0.05]])}
    masks = threshold_search(scores, views, constraint, "mac", normalize="none")
    assert masks["vision.head"].tolist() == [[1.0, 0.0]]
    assert masks["vision.neuron"].tolist() == [[0.0, 0.0, 0.0, 0.0]]  # the second head was next and did not fit
    assert math.floor(constraint * dense) - head_cost == 2 * neuron_cost < head_cost


def test_ties_edge_cases_and_determinism():
    views = TWO_TOWERS
    scores = random_scores(views, torch.Generator().manual_seed(24), "ties")
    first = threshold_search(scores, views, 0.4)
    again = get_search("threshold")(dict(reversed(list(scores.items()))), views, 0.4, "mac")
    assert all(torch.equal(first[k], again[k]) for k in scores)
    everything = threshold_search(scores, views, 1.0)
    assert all(bool((everything[k] == 1).all()) for k in scores)
    zeros = {k: torch.zeros_like(v) for k, v in scores.items()}
    check_threshold_masks(threshold_search(zeros, views, 0.3), zeros, views, 0.3, "mac", "mean")
    # neuron scores only: heads stay and are charged first; the threshold cuts neurons
    neurons_only = {"vision.neuron": scores["vision.neuron"]}
    masks = threshold_search(neurons_only, {"vision": views["vision"]}, 0.8)
    assert list(masks) == ["vision.neuron"] and 0 < masks["vision.neuron"].sum() < masks["vision.neuron"].numel()


def test_bad_inputs_name_the_key():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(25), "uniform")
    search = get_search("threshold")
    assert search.options == ("normalize",)
    with pytest.raises(ParamError, match=r"^search.options: unknown option\(s\) percentile for method 'threshold'"):
        search(scores, ONE_TOWER, 0.5, "mac", percentile=0.3)
    negative = dict(scores, **{"vision.head": scores["vision.head"] - 2.0})
    with pytest.raises(MaskError, match=r"^search 'threshold' needs non-negative importance scores; head"):
        search(negative, ONE_TOWER, 0.5, "mac")
    with pytest.raises(MaskError, match=r"scores vision.head has shape \[2, 4\]"):
        search({"vision.head": torch.rand(2, 4)}, ONE_TOWER, 0.5, "mac")


def test_report_holds_the_threshold():
    scores = random_scores(ONE_TOWER, torch.Generator().manual_seed(26), "uniform")
    report = {}
    masks = get_search("threshold")(scores, ONE_TOWER, 0.5, "params", report=report)
    assert report["kept_cost"] == flops.masked_macs(ONE_TOWER, masks, "params") <= report["budget"]
    assert report["kept_units"] == int(sum(m.sum() for m in masks.values()))
    head_mean = float(scores["vision.head"].mean())
    kept_heads = scores["vision.head"][masks["vision.head"] == 1] / head_mean
    assert float(kept_heads.min()) >= report["threshold"] - 1e-12
