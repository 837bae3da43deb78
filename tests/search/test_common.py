"""Score checks and mask summaries."""
import json
from dataclasses import replace

import pytest
import torch

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.search import check_scores, mac_search, mask_summary
from clipprune.search.common import GreedyFiller

from . import ONE_TOWER, TWO_TOWERS, random_scores, tower


def good_scores():
    return random_scores(TWO_TOWERS, torch.Generator().manual_seed(31))


def test_check_scores_returns_sorted_towers():
    assert check_scores(good_scores(), TWO_TOWERS) == ["text", "vision"]
    only_text = {"text.neuron": good_scores()["text.neuron"]}
    assert check_scores(only_text, TWO_TOWERS) == ["text"]


@pytest.mark.parametrize("key, value, message", [
    ("vision.head", torch.ones(3, 5), r"^scores vision.head has shape \[3, 5\], expected \[3, 4\] \(\[layers, heads\]\)$"),
    ("text.neuron", torch.ones(96), r"^scores text.neuron has shape \[96\], expected \[2, 96\]"),
    ("vision.head", [[1.0] * 4] * 3, r"^scores vision.head must be a real-valued tensor, got list$"),
    ("vision.head", torch.ones(3, 4, dtype=torch.bool), r"must be a real-valued tensor, got torch.bool"),
    ("vision.heads", torch.ones(3, 4), r"^scores key 'vision.heads' is malformed"),
    ("audio.head", torch.ones(3, 4), r"^scores key 'audio.head' names tower 'audio'"),
])
def test_check_scores_rejects_bad_entries(key, value, message):
    scores = good_scores()
    scores[key] = value
    with pytest.raises(MaskError, match=message):
        check_scores(scores, TWO_TOWERS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_scores_rejects_non_finite(bad):
    scores = good_scores()
    scores["vision.neuron"][1, 7] = bad
    with pytest.raises(MaskError, match=r"^scores contain NaN or inf in vision.neuron \(layer 1\)$"):
        check_scores(scores, TWO_TOWERS)
    with pytest.raises(MaskError, match="NaN or inf in vision.neuron"):
        mac_search(scores, TWO_TOWERS, 0.5)


def test_mask_summary_counts_and_fractions():
    scores = good_scores()
    masks = mac_search(scores, TWO_TOWERS, 0.4, "params")
    summary = mask_summary(masks, TWO_TOWERS, "params")
    json.dumps(summary)  # JSON-ready
    assert summary["metric"] == "params"
    assert summary["kept_fraction"] == pytest.approx(flops.kept_fraction(TWO_TOWERS, masks, "params"))
    assert summary["kept_fraction"] <= 0.4
    for name, views in TWO_TOWERS.items():
        entry = summary["towers"][name]
        assert entry["heads"] == masks[f"{name}.head"].sum(dim=1).int().tolist()
        assert entry["neurons"] == masks[f"{name}.neuron"].sum(dim=1).int().tolist()
        assert entry["num_heads"] == [v.num_heads for v in views]
        assert entry["ffn_dim"] == [v.ffn_dim for v in views]
        head_cost, neuron_cost = flops.unit_costs(views[0], "params")
        dense_layer = views[0].num_heads * head_cost + views[0].ffn_dim * neuron_cost
        assert entry["layer_kept_fraction"] == pytest.approx(
            [(h * head_cost + n * neuron_cost) / dense_layer for h, n in zip(entry["heads"], entry["neurons"])])
        one = {k: v for k, v in masks.items() if k.startswith(name)}
        assert entry["kept_fraction"] == pytest.approx(flops.kept_fraction({name: views}, one, "params"))


def test_mask_summary_missing_kind_is_dense_and_padding_checked():
    masks = {"vision.neuron": torch.zeros(3, 64)}
    summary = mask_summary(masks, TWO_TOWERS)
    assert list(summary["towers"]) == ["vision"]
    assert summary["towers"]["vision"]["heads"] == [4, 4, 4]
    views = ONE_TOWER["vision"]
    heads_only = sum(v.num_heads * flops.head_macs(v) for v in views) / flops.tower_macs(views)
    assert summary["kept_fraction"] == pytest.approx(heads_only)

    padded_views = {"vision": [views[0], replace(views[1], num_heads=2), views[2]]}
    head = torch.ones(3, 4)
    with pytest.raises(MaskError, match=r"mask vision.head layer 1 has only 2 units"):
        mask_summary({"vision.head": head}, padded_views)
    head[1, 2:] = 0
    assert mask_summary({"vision.head": head}, padded_views)["towers"]["vision"]["heads"] == [4, 2, 4]
    with pytest.raises(ParamError, match="metric must be one of 'mac', 'params'"):  # flops' own dispatch
        mask_summary(masks, TWO_TOWERS, "flops")


def test_greedy_filler_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(32)
    for _ in range(50):
        costs = torch.randint(1, 4, (30,), generator=generator).mul(torch.tensor([1, 5, 7])[torch.randint(0, 3, (1,), generator=generator)])
        scores = torch.rand(30, generator=generator).double()
        budgets = torch.randint(0, 200, (6,), generator=generator)
        gained, spent = GreedyFiller(costs.numpy(), scores.numpy()).run(budgets.numpy())
        for b, g, s in zip(budgets.tolist(), gained, spent):
            left, total, kept = b, 0.0, []
            for c, v in zip(costs.tolist(), scores.tolist()):
                if c <= left:
                    left -= c
                    total += v
                    kept.append(True)
                else:
                    kept.append(False)
            assert s == b - left and g == pytest.approx(total)
            _, _, flags = GreedyFiller(costs.numpy(), scores.numpy()).run([b], record=True)
            assert flags.tolist() == kept
