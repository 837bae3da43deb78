"""Mask rearrangement (Kwon et al.): within each layer, swap kept and pruned units to lower the loss.

The loss increase of pruning a set ``P`` of units of one layer is approximated with the block-diagonal
(per-layer) empirical Fisher: ``Σ_rows (Σ_{u∈P} g_row,u)²``, where ``g_row,u`` is the gradient of the
loss with respect to unit ``u``'s mask on one row (a batch or a sample). Unlike the diagonal Fisher used
for the search, it accounts for pruned units whose gradients cancel or add up.

Per layer the number of kept units is fixed; a greedy local search repeatedly applies the single swap
(kept ``i`` → pruned, pruned ``j`` → kept) that lowers the objective most. With ``p`` the pruned-sum
vector over rows and ``Q = gᵀg`` the units' Gram matrix, the change of a swap is

    Δ(i, j) = ‖p + g_i − g_j‖² − ‖p‖² = (Q_ii + 2 v_i) + (Q_jj − 2 v_j) − 2 Q_ij,   v = gᵀp,

so all kept × pruned pairs are scored at once from the kept × pruned block of ``Q`` (computed once per
layer); after a swap ``v`` changes by ``Q[:, i] − Q[:, j]`` and the block by one row and one column.
The search stops when no swap lowers the objective (a 1-swap local optimum) or after ``max_iters`` swaps.
Each swap costs O(kept × pruned); everything is float64 and ties go to the lowest index: deterministic.

Where the swaps end depends on where they start (from random starts with the same counts they often end
worse than Kwon's reference), so ``rearrange_masks`` runs them from two starts and keeps the better end:
the searched masks, and Kwon's one-pass greedy assignment (``greedy_assignment``), which depends only on
the gradients and the count. The result is therefore never worse than either the searched masks or the
greedy assignment; the per-layer report records all three objectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import MaskError, ParamError
from ..models.masks import parse_mask_key
from ..progress import progress_bar

__all__ = ["rearrange_masks", "rearrange_layer", "greedy_assignment", "rearrange_layer_from_both",
           "rearrangement_objective", "LayerResult", "BothStartsResult"]

GRADS_SUFFIX = ".grads"


@dataclass
class LayerResult:
    kept: torch.Tensor  # bool [units]
    objective_before: float
    objective_after: float
    swaps: int


@dataclass
class BothStartsResult:
    kept: torch.Tensor  # bool [units], the better of the two ends
    objective_searched: float  # the given (searched) assignment, before any swap
    objective_greedy: float  # Kwon's one-pass greedy assignment, before any swap
    objective_after: float
    start: str  # "searched" or "greedy": where the kept result's swaps started
    swaps: int  # swaps of the kept result


def _pruned_sum_objective(grads: torch.Tensor, kept: torch.Tensor) -> float:
    pruned_sum = grads[:, ~kept].sum(dim=1)
    return float(pruned_sum @ pruned_sum)


def rearrange_layer(grads: torch.Tensor, kept: torch.Tensor, max_iters: int | None = None) -> LayerResult:
    """Greedy 1-swap search on one layer.

    ``grads`` ``[rows, units]``; ``kept`` bool ``[units]``. Returns the new kept set (same count) and the
    objective ``Σ_rows (Σ_{pruned} g)²`` before and after; the objective never increases.
    """
    g = grads.detach().to(torch.float64)
    kept = kept.detach().to(torch.bool).clone()
    before = _pruned_sum_objective(g, kept)
    units = g.shape[1]
    if kept.all() or not kept.any():
        return LayerResult(kept, before, before, 0)
    gram = g.t() @ g  # [units, units], symmetric
    diag = gram.diagonal().clone()
    kept_idx = torch.nonzero(kept).flatten()
    pruned_idx = torch.nonzero(~kept).flatten()
    # the kept × pruned block of the Gram matrix, kept up to date by one row and one column per swap
    block = gram[kept_idx][:, pruned_idx].contiguous()
    v = gram[:, pruned_idx].sum(dim=1)  # gᵀp for every unit, p = pruned sum
    # a swap must beat rounding noise of the objective's scale to count as an improvement
    tolerance = 1e-12 * max(before, float(diag.max()), 1e-300)
    swaps = 0
    while max_iters is None or swaps < max_iters:
        delta = torch.add((diag + 2 * v)[kept_idx][:, None], (diag - 2 * v)[pruned_idx][None, :])
        delta.add_(block, alpha=-2)
        a, b = divmod(int(torch.argmin(delta)), pruned_idx.numel())
        if not float(delta[a, b]) < -tolerance:
            break
        i, j = int(kept_idx[a]), int(pruned_idx[b])  # i leaves the kept set, j joins it
        v += gram[i] - gram[j]
        kept_idx[a], pruned_idx[b] = j, i
        block[a, :] = gram[j, pruned_idx]
        block[:, b] = gram[i, kept_idx]
        swaps += 1
    new_kept = torch.zeros(units, dtype=torch.bool)
    new_kept[kept_idx] = True
    return LayerResult(new_kept, before, _pruned_sum_objective(g, new_kept), swaps)


def greedy_assignment(grads: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Kwon's one-pass greedy assignment of one layer: the kept set (bool ``[units]``) of size ``n_kept``.

    Units are visited in ascending order of their Fisher diagonal ``Σ_rows g²``; the first ``units − n_kept``
    start as the pruned set, then each further unit joins it and the member whose removal leaves the
    smallest ``‖Σ_{pruned} g‖²`` leaves it again. With ``s`` the pruned sum and ``v = gᵀs``, removing ``w``
    leaves ``‖s‖² − 2 v_w + Q_ww``, so one step is an argmin over the members of ``Q_ww − 2 v_w``.
    Ties go to the lowest unit index (the sort is stable): deterministic.
    """
    g = grads.detach().to(torch.float64)
    units = g.shape[1]
    if not 0 <= n_kept <= units:
        raise ValueError(f"n_kept must be in [0, {units}], got {n_kept}")
    n_pruned = units - n_kept
    if n_pruned == 0 or n_kept == 0:
        return torch.full((units,), n_kept > 0, dtype=torch.bool)
    gram = g.t() @ g
    diag = gram.diagonal().clone()
    order = torch.sort(diag, stable=True).indices
    pruned = torch.zeros(units, dtype=torch.bool)
    pruned[order[:n_pruned]] = True
    v = gram[:, pruned].sum(dim=1)
    for unit in order[n_pruned:].tolist():
        pruned[unit] = True
        v += gram[:, unit]
        cost = torch.where(pruned, diag - 2 * v, torch.tensor(float("inf"), dtype=torch.float64))
        leaving = int(torch.argmin(cost))
        pruned[leaving] = False
        v -= gram[:, leaving]
    return ~pruned


def rearrange_layer_from_both(grads: torch.Tensor, kept: torch.Tensor,
                              max_iters: int | None = None) -> BothStartsResult:
    """Swap search from the given assignment and from Kwon's greedy one; the lower end wins.

    Never worse than the given assignment nor than the greedy one (each swap search only lowers its
    start's objective). Equal ends keep the searched start's result (fewer changes to explain).
    """
    kept = kept.detach().to(torch.bool)
    from_searched = rearrange_layer(grads, kept, max_iters)
    greedy = greedy_assignment(grads, int(kept.sum()))
    from_greedy = rearrange_layer(grads, greedy, max_iters)
    best, start = from_searched, "searched"
    if from_greedy.objective_after < from_searched.objective_after:
        best, start = from_greedy, "greedy"
    return BothStartsResult(best.kept, from_searched.objective_before, from_greedy.objective_before,
                            best.objective_after, start, best.swaps)


def _find_grads(grads: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    for name in (key + GRADS_SUFFIX, key):
        if name in grads:
            return grads[name]
    return None


def _check_inputs(masks: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                  widths: Mapping[str, Sequence[int]] | None):
    checked = {}
    for key, mask in masks.items():
        parse_mask_key(key)
        g = _find_grads(grads, key)
        if g is None:
            continue
        if mask.dim() != 2:
            raise MaskError(f"masks: {key} must be [layers, units], got shape {list(mask.shape)}")
        values = mask.detach()
        if not bool(((values == 0) | (values == 1)).all()):
            raise MaskError(f"masks: {key} must be binary (0/1) for rearrangement; rearrange before tuning")
        if g.dim() != 3 or tuple(g.shape[1:]) != tuple(mask.shape) or g.shape[0] < 1:
            raise MaskError(f"grads: {key}{GRADS_SUFFIX} must have shape [rows, {mask.shape[0]}, {mask.shape[1]}] "
                            f"to match the mask, got {list(g.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise MaskError(f"grads: {key}{GRADS_SUFFIX} contains non-finite values")
        layer_widths = [mask.shape[1]] * mask.shape[0]
        if widths is not None and key in widths:
            layer_widths = [int(w) for w in widths[key]]
            if len(layer_widths) != mask.shape[0] or any(not 0 <= w <= mask.shape[1] for w in layer_widths):
                raise MaskError(f"widths: {key} must list {mask.shape[0]} widths in [0, {mask.shape[1]}]")
        checked[key] = (g, layer_widths)
    return checked


def rearrange_masks(masks: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], *,
                    max_iters: int | None = None, widths: Mapping[str, Sequence[int]] | None = None,
                    report: list | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Rearrange binary masks layer by layer, keeping each layer's number of kept units.

    ``grads``: ``"<tower>.<kind>.grads"`` (or ``"<tower>.<kind>"``) → ``[rows, layers, units]``, the mask
    gradients per batch or per sample (the scoring stage's output). Masks without gradients are returned
    unchanged. Each layer's swaps run from the searched masks and from Kwon's greedy assignment and the
    better end is kept (``rearrange_layer_from_both``). ``max_iters``: most swaps per layer and start
    (``None``: until no swap improves). ``widths``:
    per-key list of each layer's present units, for models whose blocks were already pruned to
    different widths (units past a layer's width are never swapped in). ``report``: if a list is given,
    one dict per layer is appended: key, layer, kept, the objectives of the searched assignment
    (``objective_before``), of the greedy one (``objective_greedy``) and of the result
    (``objective_after``), which start won (``start``) and its ``swaps``.
    Returns new float masks (0/1) on the masks' devices and dtypes.
    """
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0):
        raise ParamError(f"tune.rearrange_max_iters must be a non-negative integer or null, got {max_iters!r}")
    checked = _check_inputs(masks, grads, widths)
    total = sum(masks[k].shape[0] for k in checked)
    out = {key: mask.detach().clone() for key, mask in masks.items()}
    with progress_bar(total=total, desc="rearrange", unit="layer", enabled=progress) as bar:
        for key, (g, layer_widths) in checked.items():
            mask = out[key]
            for layer, width in enumerate(layer_widths):
                kept = mask[layer, :width].detach().cpu() != 0
                result = rearrange_layer_from_both(g[:, layer, :width].cpu(), kept, max_iters)
                new_row = torch.zeros(mask.shape[1], dtype=mask.dtype)
                new_row[:width] = result.kept.to(mask.dtype)
                mask[layer] = new_row.to(mask.device)
                if report is not None:
                    report.append({"key": key, "layer": layer, "kept": int(result.kept.sum()),
                                   "objective_before": result.objective_searched,
                                   "objective_greedy": result.objective_greedy,
                                   "objective_after": result.objective_after,
                                   "start": result.start, "swaps": result.swaps})
                bar.update(1)
    return out


def rearrangement_objective(masks: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """Per key, the objective ``Σ_rows (Σ_{pruned} g)²`` of each layer (float64 ``[layers]``).

    Entries with mask 0 count as pruned (padding columns of narrower layers should have zero gradients).
    """
    out = {}
    for key, mask in masks.items():
        g = _find_grads(grads, key)
        if g is None:
            continue
        pruned = (mask.detach().cpu() == 0).to(torch.float64)  # [layers, units]
        pruned_sum = torch.einsum("rlu,lu->rl", g.detach().cpu().to(torch.float64), pruned)
        out[key] = pruned_sum.pow(2).sum(dim=0)
    return out
