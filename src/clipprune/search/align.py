"""Hardware-aligned widths (``search.align: N``): each layer's kept neurons rounded to a multiple of N.

Matrix kernels run faster on widths that are multiples of 8, 16 or 64. After the search, every layer whose
kept neuron count ``n`` is not a multiple of ``N`` (and not the full width) is first rounded down to
``floor(n / N) * N``; the budget freed that way then rounds layers back up to the next multiple (or the full
width), greedily by score gained per unit of cost, each only if it still fits. So the kept cost never
exceeds the budget the search had, and each layer ends at its rounded-down or rounded-up width. The kept
neurons of a layer are its best-scored ones (what the search keeps within a layer). Heads are not touched
(a head is ``head_dim`` wide already).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from clipprune.models.base import BlockView

CostFn = Callable[[str, int, str, int], int]  # (tower, layer, kind, kept count) -> integer cost


def aligned_counts(counts: Sequence[int], widths: Sequence[int], gains: Sequence[np.ndarray],
                   costs: Sequence[Callable[[int], int]], slack: int, align: int) -> list[int]:
    """Per-layer kept counts rounded to multiples of ``align`` (or the full width) within ``slack``.

    ``gains[l]``: layer ``l``'s scores sorted best first; ``costs[l](n)``: the cost of keeping ``n`` units
    (non-decreasing); ``slack``: budget left by the current counts (>= 0). Returns the new counts.
    """
    new = []
    for n, width, cost in zip(counts, widths, costs):
        down = n if (n % align == 0 or n == width) else (n // align) * align
        slack += cost(n) - cost(down)
        new.append(down)
    candidates = []
    for layer, (n, down, width) in enumerate(zip(counts, new, widths)):
        if down == n:
            continue
        up = min(down + align, width)
        extra = costs[layer](up) - costs[layer](down)
        gain = float(np.sum(gains[layer][down:up]))
        candidates.append((-(gain / extra) if extra > 0 else -np.inf, layer, up, extra))
    for _, layer, up, extra in sorted(candidates):
        if extra <= slack:
            slack -= extra
            new[layer] = up
    return new


def align_neurons(masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor],
                  views: Mapping[str, Sequence[BlockView]], align: int, cost: CostFn, budget: int,
                  fixed_cost: int = 0) -> dict[str, torch.Tensor]:
    """``masks`` with every ``<tower>.neuron`` layer's kept count aligned (module docstring).

    ``cost(tower, layer, kind, count)`` prices one layer's kept heads / neurons; ``budget`` bounds
    ``fixed_cost + Σ cost`` over all searched layers and kinds (the search's own budget and units).
    """
    if align <= 1:
        return dict(masks)
    towers = sorted({key.split(".")[0] for key in masks})
    total = fixed_cost
    layers = []  # (tower, layer, width, count, sorted gains)
    for tower in towers:
        for kind in ("head", "neuron"):
            mask = masks.get(f"{tower}.{kind}")
            for layer, view in enumerate(views[tower]):
                width = view.num_heads if kind == "head" else view.ffn_dim
                count = width if mask is None else int((mask[layer, :width] != 0).sum())
                total += cost(tower, layer, kind, count)
                if kind == "neuron" and f"{tower}.neuron" in scores:
                    row = scores[f"{tower}.neuron"][layer, :width].detach().to("cpu", torch.float64).numpy()
                    layers.append((tower, layer, width, count, np.sort(row)[::-1]))
    counts = aligned_counts([entry[3] for entry in layers], [entry[2] for entry in layers],
                            [entry[4] for entry in layers],
                            [lambda n, t=t, l=l: cost(t, l, "neuron", n) for t, l, *_ in layers],
                            budget - total, align)
    out = dict(masks)
    for tower in towers:
        key = f"{tower}.neuron"
        if key not in scores:
            continue
        table = scores[key].detach().to("cpu", torch.float64)
        mask = torch.zeros_like(masks[key])
        for (t, layer, width, _, _), n in zip(layers, counts):
            if t != tower:
                continue
            order = torch.sort(-table[layer, :width], stable=True).indices
            mask[layer, order[:n]] = 1.0
        out[key] = mask
    return out
