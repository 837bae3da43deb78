"""Wanda (Sun et al. 2023): prune by ``|W_ij| · ‖X_j‖₂`` within each output row; no weight update.

``‖X_j‖₂`` is the norm of input feature ``j`` over every calibration token reaching the layer (computed
block by block on the partly pruned model, ``inputs.prune_sequentially``). The comparison group is one
output row: unstructured targets remove the same count from every row (``round(target · weights)`` in the
layer, the first rows one more when it does not divide), so each layer and the whole meet the target
exactly; block4 ranks groups of 4 inputs of a row by the L2 norm of their scores; N:M keeps the N highest
scores of every M inputs of a row. Weights already zero score 0 and go first, so pruning an already
pruned model (``num_recomputations``) only adds to its mask.
"""
from __future__ import annotations

import torch

from .config import MaskType, SparsityConfig
from .inputs import InputSource, prune_at_targets
from .masks import check_alignment, nm_mask_from_scores
from .registry import SparsityResult, register_method


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` from ``Σ_tokens x_j²`` per input feature."""
    return weight.abs() * input_sq_norm.sqrt().unsqueeze(0)


def row_counts(rows: int, units_per_row: int, target: float) -> torch.Tensor:
    """Units pruned in each row: ``round(target · rows · units_per_row)`` in all, spread evenly (the first
    rows one more); each row's count never falls as ``target`` rises."""
    total = round(target * rows * units_per_row)
    counts = torch.full((rows,), total // rows, dtype=torch.long)
    counts[: total % rows] += 1
    return counts


def wanda_prune(weight: torch.Tensor, input_sq_norm: torch.Tensor, mask: MaskType,
                target: float | None) -> torch.Tensor:
    """``weight [out, in]`` with its lowest-scoring units zeroed (``target`` unused for N:M)."""
    scores = wanda_scores(weight, input_sq_norm)
    if mask.kind == "nm":
        return weight * nm_mask_from_scores(scores, mask.n, mask.m)
    units = scores.reshape(scores.shape[0], -1, mask.group).pow(2).sum(2)  # [out, in / group]
    counts = row_counts(units.shape[0], units.shape[1], target)
    # stable ranking: equal scores go in index order
    rank = torch.argsort(torch.argsort(units, dim=1, stable=True), dim=1)
    prune = rank < counts.unsqueeze(1)
    return weight * ~prune.repeat_interleave(mask.group, dim=1)


@register_method("wanda", source="inputs")
def wanda_sparsify(layers, config: SparsityConfig, inputs: InputSource, progress: bool = True) -> SparsityResult:
    """Wanda at every target of ``config``, each target on its own sequential pass (see module docstring)."""
    mask = config.mask
    for name, layer in layers.items():
        check_alignment(name, layer.weight, mask)
    def prune_layer(target):
        return lambda name, weight, sq_norm: wanda_prune(weight, sq_norm, mask, target).float()

    weights = prune_at_targets(list(layers), config, inputs, "sq_norm", prune_layer, "wanda")
    return SparsityResult(weights, _meta(config, inputs))


def _meta(config: SparsityConfig, inputs: InputSource) -> dict:
    return {"allocation": "per group (N:M)" if config.mask.kind == "nm" else "per output row",
            "num_samples_used": inputs.num_samples, "calibration_passes": inputs.passes}
