"""Optimal Brain Surgeon inside Fisher blocks (CAP), vectorised over all blocks of one weight tensor.

Per block with weights ``w`` and inverse Fisher ``F⁻¹``, one step eliminates the unit of least saliency:

* single weights (unstructured, N:M): saliency ``w_q² / (2 [F⁻¹]_qq)``; update of the remaining weights
  ``w ← w − (w_q / [F⁻¹]_qq) F⁻¹[:, q]``; ``F⁻¹ ← F⁻¹ − F⁻¹[:, q] F⁻¹[q, :] / [F⁻¹]_qq`` (Gaussian elimination
  of row/column q);
* groups ``S`` of 4 weights (block4): saliency ``½ w_Sᵀ ([F⁻¹]_SS)⁻¹ w_S``, update
  ``w ← w − F⁻¹[:, S] ([F⁻¹]_SS)⁻¹ w_S`` and ``F⁻¹ ← F⁻¹ − F⁻¹[:, S] ([F⁻¹]_SS)⁻¹ F⁻¹[S, :]``.

The sweep records, per block, the cumulative OBS loss after every step (``inf`` where a block has no unit
left); thresholding these over all layers gives the global allocation. Given per-block step counts, the
same sweep returns the weights at those counts ("snapshots"), one set per sparsity target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MaskType


@dataclass
class ObsTrace:
    """``cum_loss``/``order``: ``[blocks, steps]`` (order: eliminated unit, -1 when none); ``weights``: the
    weights after the last step; ``snapshots``: ``[targets, blocks, B]`` weights at the requested counts."""

    cum_loss: torch.Tensor
    order: torch.Tensor
    weights: torch.Tensor
    snapshots: torch.Tensor | None = None


def num_steps(block_size: int, mask: MaskType) -> int:
    """Eliminations per (full) block: every unit, or (M−N) per M-group for N:M."""
    if mask.kind == "nm":
        return block_size // mask.m * (mask.m - mask.n)
    return block_size // mask.group


def obs_sweep(weights: torch.Tensor, inverse: torch.Tensor, valid: torch.Tensor, mask: MaskType,
              snapshot_counts: torch.Tensor | None = None) -> ObsTrace:
    """Run OBS on every block: ``weights [blocks, B]``, ``inverse [blocks, B, B]`` (overwritten: pass a copy
    to keep it), ``valid [blocks, B]`` (False at padding). ``snapshot_counts [targets, blocks]``: units to
    eliminate per block for each target (None: no snapshots).

    Computation runs in ``inverse``'s dtype; ties in saliency go to the lowest index.
    """
    if mask.group > 1:
        return _group_sweep(weights, inverse, valid, mask, snapshot_counts)
    dtype = inverse.dtype
    blocks, size = weights.shape
    w = weights.to(dtype).clone() * valid
    alive = valid.clone()
    rows = torch.arange(blocks)
    steps = num_steps(size, mask)
    cum = torch.zeros(blocks, dtype=dtype)
    cum_loss = torch.full((blocks, steps), float("inf"), dtype=dtype)
    order = torch.full((blocks, steps), -1, dtype=torch.long)
    if mask.kind == "nm":
        eliminated = torch.zeros(blocks, size // mask.m, dtype=torch.long)
    snaps = _init_snapshots(w, snapshot_counts)
    inf = torch.tensor(float("inf"), dtype=dtype)
    for step in range(steps):
        diag = inverse.diagonal(dim1=1, dim2=2)
        saliency = torch.where(alive, w * w / (2 * diag), inf)
        if mask.kind == "nm":  # a full N:M group takes no more eliminations
            full = (eliminated >= mask.m - mask.n).repeat_interleave(mask.m, dim=1)
            saliency = torch.where(full, inf, saliency)
        q = torch.argmin(saliency, dim=1)
        loss = saliency[rows, q]
        active = torch.isfinite(loss)
        cum = cum + torch.where(active, loss, 0)
        cum_loss[:, step] = torch.where(active, cum, inf)
        order[:, step] = torch.where(active, q, -1)
        column = inverse[rows, :, q]  # [blocks, B] = F⁻¹[:, q]
        pivot = column[rows, q]
        coef = torch.where(active, w[rows, q] / pivot, 0)
        w -= coef.unsqueeze(1) * column
        scale = torch.where(active, 1 / pivot, 0)
        inverse.baddbmm_(column.unsqueeze(2), (column * scale.unsqueeze(1)).unsqueeze(1), alpha=-1)
        hit = rows[active]
        alive[hit, q[active]] = False
        if mask.kind == "nm":
            eliminated[hit, q[active] // mask.m] += 1
        w *= alive  # eliminated weights are exactly zero, not round-off away from it
        _take_snapshots(snaps, snapshot_counts, w, step + 1)
    return ObsTrace(cum_loss=cum_loss, order=order, weights=w, snapshots=snaps)


def _group_sweep(weights, inverse, valid, mask: MaskType, snapshot_counts) -> ObsTrace:
    """OBS over groups of ``mask.group`` consecutive weights (block4)."""
    g = mask.group
    dtype = inverse.dtype
    blocks, size = weights.shape
    units = size // g
    w = weights.to(dtype).clone() * valid
    alive = valid.reshape(blocks, units, g).all(2)  # a group is either all padding or all real
    rows = torch.arange(blocks)
    offsets = torch.arange(g)
    eye = torch.eye(g, dtype=dtype)
    cum = torch.zeros(blocks, dtype=dtype)
    cum_loss = torch.full((blocks, units), float("inf"), dtype=dtype)
    order = torch.full((blocks, units), -1, dtype=torch.long)
    snaps = _init_snapshots(w, snapshot_counts)
    inf = torch.tensor(float("inf"), dtype=dtype)
    for step in range(units):
        diag_blocks = torch.diagonal(inverse.reshape(blocks, units, g, units, g), dim1=1, dim2=3)
        diag_blocks = diag_blocks.permute(0, 3, 1, 2)  # [blocks, units, g, g] = [F⁻¹]_SS of each group
        diag_blocks = torch.where(alive[..., None, None], diag_blocks, eye)
        block_inv = torch.linalg.inv(diag_blocks)
        wu = w.reshape(blocks, units, g)
        saliency = 0.5 * torch.einsum("bui,buij,buj->bu", wu, block_inv, wu)
        saliency = torch.where(alive, saliency, inf)
        q = torch.argmin(saliency, dim=1)
        loss = saliency[rows, q]
        active = torch.isfinite(loss)
        cum = cum + torch.where(active, loss, 0)
        cum_loss[:, step] = torch.where(active, cum, inf)
        order[:, step] = torch.where(active, q, -1)
        index = q.unsqueeze(1) * g + offsets  # [blocks, g]
        columns = inverse[rows.unsqueeze(1), :, index].transpose(1, 2)  # [blocks, B, g] = F⁻¹[:, S]
        pivot_inv = block_inv[rows, q] * active[:, None, None]  # ([F⁻¹]_SS)⁻¹, zero when inactive
        w_s = wu[rows, q]  # [blocks, g]
        w -= torch.bmm(columns, torch.bmm(pivot_inv, w_s.unsqueeze(2))).squeeze(2)
        inverse -= torch.bmm(torch.bmm(columns, pivot_inv), columns.transpose(1, 2))
        alive[rows[active], q[active]] = False
        w *= alive.repeat_interleave(g, dim=1)
        _take_snapshots(snaps, snapshot_counts, w, step + 1)
    return ObsTrace(cum_loss=cum_loss, order=order, weights=w, snapshots=snaps)


def _init_snapshots(w: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor | None:
    if counts is None:
        return None
    snaps = w.unsqueeze(0).repeat(counts.shape[0], 1, 1)  # count 0: the weights as they are
    return snaps


def _take_snapshots(snaps, counts, w: torch.Tensor, done: int) -> None:
    if snaps is None:
        return
    for t in range(counts.shape[0]):
        hit = counts[t] == done
        if bool(hit.any()):
            snaps[t, hit] = w[hit]
