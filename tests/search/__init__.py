"""Shared helpers for the search tests: tiny towers, random scores, budget checks, brute force."""
from __future__ import annotations

import math

import torch

from clipprune import flops
from clipprune.models.base import BlockView


def tower(layers: int, heads: int, head_dim: int, hidden: int, ffn: int, tokens: int) -> list[BlockView]:
    return [BlockView(index=i, num_heads=heads, head_dim=head_dim, hidden=hidden, ffn_dim=ffn, tokens=tokens)
            for i in range(layers)]


# two towers with different s, d and dh, so head and neuron costs differ between them
ONE_TOWER = {"vision": tower(3, 4, 8, 32, 64, 17)}
TWO_TOWERS = {"vision": tower(3, 4, 8, 32, 64, 17), "text": tower(2, 4, 12, 48, 96, 9)}


def random_scores(views: dict, generator: torch.Generator, kind: str = "uniform") -> dict[str, torch.Tensor]:
    """Score tensors for every tower in ``views``, drawn in one of a few shapes of distribution."""
    scores = {}
    for name, blocks in views.items():
        for unit, width in (("head", blocks[0].num_heads), ("neuron", blocks[0].ffn_dim)):
            shape = (len(blocks), width)
            if kind == "uniform":
                values = torch.rand(shape, generator=generator)
            elif kind == "heavy":  # heavy-tailed, Fisher-like
                values = torch.randn(shape, generator=generator).pow(2) * 10 ** torch.randint(-3, 3, (1,), generator=generator)
            elif kind == "ties":  # few distinct values, many ties
                values = torch.randint(0, 3, shape, generator=generator).double()
            else:  # sparse: mostly zeros
                values = torch.rand(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.2)
            scores[f"{name}.{unit}"] = values.double() if unit == "head" else values.double() * 0.05
    return scores


def cheapest_unkept_neuron(masks: dict, views: dict, metric: str) -> float:
    """Cost of the cheapest neuron a mask drops (inf when every neuron is kept)."""
    cheapest = math.inf
    for name, blocks in views.items():
        key = f"{name}.neuron"
        if key not in masks:
            continue
        for layer, view in enumerate(blocks):
            if bool((masks[key][layer, :view.ffn_dim] == 0).any()):
                cheapest = min(cheapest, flops.unit_costs(view, metric)[1])
    return cheapest


def assert_within_budget(masks: dict, views: dict, constraint: float, metric: str) -> None:
    """Kept cost <= constraint × dense, and less than one (cheapest unkept) neuron's cost below budget."""
    searched = {name: views[name] for name in {key.split(".")[0] for key in masks}}
    dense = flops.prunable_macs(searched, metric)
    kept = flops.masked_macs(searched, masks, metric)
    budget = math.floor(constraint * dense)
    assert kept <= constraint * dense
    assert budget - kept < cheapest_unkept_neuron(masks, searched, metric), (budget - kept, metric)
    for mask in masks.values():
        assert mask.dtype == torch.float32
        assert bool(((mask == 0) | (mask == 1)).all())


def kept_score(masks: dict, scores: dict) -> float:
    return float(sum((scores[key].double() * (masks[key] != 0)).sum() for key in masks))
