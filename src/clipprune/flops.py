"""The MAC (and parameter) model of the prunable part of a transformer tower.

Following Kwon et al. (2022), a block with ``s`` tokens, residual width ``d`` and head size ``dh`` costs

* per attention head: ``4·s·d·dh`` (q, k, v and output projections) + ``2·s²·dh`` (scores and context);
* per MLP neuron: ``2·s·d`` (its fc1 row and fc2 column).

Embeddings, LayerNorm, softmax and the final projections are outside the pruning budget; they are
counted separately by :func:`non_prunable_macs`. The same bookkeeping is offered for parameters
(``metric="params"``): a head owns its q/k/v rows with biases and its out-projection columns
(``4·d·dh + 3·dh``; the out-projection bias belongs to the block), a neuron its fc1 row, fc1 bias and fc2
column (``2·d + 1``).

Masks are dicts keyed ``"<tower>.head"`` (layers × heads) and ``"<tower>.neuron"`` (layers × ffn); a unit
counts as kept when its mask entry is non-zero (tuned masks hold real-valued scales).
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from clipprune.config import METRICS  # the budget metrics (search.metric)
from clipprune.errors import MaskError, ParamError
from clipprune.models.base import BlockView, ClipModel, Tower

# What the tower-level functions accept: a ClipModel, a mapping tower name -> Tower or BlockView list,
# or a bare list of BlockViews (one tower).
TowersLike = Union[ClipModel, Mapping[str, Union[Tower, Sequence[BlockView]]], Sequence[BlockView]]
MaskLike = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# per unit / per block
# ---------------------------------------------------------------------------------------------
def head_macs(view: BlockView) -> int:
    """MACs of one attention head of ``view``: 4·s·d·dh + 2·s²·dh."""
    s, d, dh = view.tokens, view.hidden, view.head_dim
    return 4 * s * d * dh + 2 * s * s * dh


def neuron_macs(view: BlockView) -> int:
    """MACs of one MLP neuron of ``view``: 2·s·d."""
    return 2 * view.tokens * view.hidden


def head_params(view: BlockView) -> int:
    """Parameters one head owns: q, k, v weights and biases and its out-projection columns."""
    d, dh = view.hidden, view.head_dim
    return 4 * d * dh + 3 * dh


def neuron_params(view: BlockView) -> int:
    """Parameters one MLP neuron owns: its fc1 row, fc1 bias and fc2 column."""
    return 2 * view.hidden + 1


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is a known budget metric, else raise ParamError."""
    if metric not in METRICS:
        raise ParamError(f"metric must be one of {', '.join(repr(m) for m in METRICS)}, got {metric!r}")
    return metric


def unit_costs(view: BlockView, metric: str = "mac") -> tuple[int, int]:
    """(cost of one head, cost of one neuron) of ``view`` under ``metric`` ("mac" or "params")."""
    if check_metric(metric) == "mac":
        return head_macs(view), neuron_macs(view)
    return head_params(view), neuron_params(view)


def block_macs(view: BlockView, metric: str = "mac") -> int:
    """Prunable cost of a block with all its current heads and neurons."""
    head_cost, neuron_cost = unit_costs(view, metric)
    return view.num_heads * head_cost + view.ffn_dim * neuron_cost


def tower_macs(views: Sequence[BlockView], metric: str = "mac") -> int:
    """Prunable cost of a tower (sum over its blocks, current widths)."""
    return sum(block_macs(v, metric) for v in views)


# ---------------------------------------------------------------------------------------------
# towers and masks
# ---------------------------------------------------------------------------------------------
def as_tower_views(towers: TowersLike) -> dict[str, list[BlockView]]:
    """Normalise a ClipModel / mapping / bare BlockView list to ``{tower name: [BlockView, ...]}``.

    A bare list gets the name ``""`` (see :func:`masked_macs` for how its masks are found).
    """
    if isinstance(towers, ClipModel) or (hasattr(towers, "towers") and not isinstance(towers, Mapping)):
        towers = towers.towers
    if isinstance(towers, Mapping):
        out = {}
        for name, tower in towers.items():
            out[name] = list(tower.block_views()) if isinstance(tower, Tower) or hasattr(tower, "block_views") \
                else list(tower)
        return out
    views = list(towers)
    if not all(isinstance(v, BlockView) for v in views):
        raise TypeError("towers must be a ClipModel, a mapping of tower name to Tower/BlockView list, "
                        "or a list of BlockView")
    return {"": views}


def prunable_macs(towers: TowersLike, metric: str = "mac") -> int:
    """Dense prunable cost summed over the given towers (all current heads and neurons)."""
    return sum(tower_macs(views, metric) for views in as_tower_views(towers).values())


def kept_counts(mask: MaskLike, widths: Sequence[int], key: str) -> list[int]:
    """Number of non-zero entries per layer of ``mask``, checked against the layer ``widths``.

    ``mask`` is a 2-D tensor (layers × width) when every layer has the same width, or a sequence of 1-D
    tensors (one per layer) when widths differ.
    """
    if isinstance(mask, torch.Tensor) or not isinstance(mask, Sequence):
        mask = torch.as_tensor(mask)
        if mask.dim() != 2 or mask.shape[0] != len(widths) or any(w != mask.shape[1] for w in widths):
            raise MaskError(f"mask {key!r} has shape {tuple(mask.shape)}, expected "
                            f"({len(widths)}, width) with layer widths {list(widths)}")
        return [int(n) for n in (mask != 0).sum(dim=1).tolist()]
    if len(mask) != len(widths):
        raise MaskError(f"mask {key!r} has {len(mask)} layers, expected {len(widths)}")
    counts = []
    for layer, (row, width) in enumerate(zip(mask, widths)):
        row = torch.as_tensor(row)
        if row.dim() != 1 or row.shape[0] != width:
            raise MaskError(f"mask {key!r} layer {layer} has shape {tuple(row.shape)}, expected ({width},)")
        counts.append(int((row != 0).sum()))
    return counts


def _masks_by_tower(masks: Mapping[str, MaskLike], tower_names: Sequence[str]) -> dict[str, dict[str, MaskLike]]:
    """Split ``{"<tower>.head": m, ...}`` into ``{tower: {"head": m, "neuron": m}}``; bare lists map to ``""``."""
    grouped: dict[str, dict[str, MaskLike]] = {}
    for key, value in masks.items():
        tower, _, kind = key.rpartition(".")
        if kind not in ("head", "neuron"):
            continue  # other entries (metadata, weight masks) are not structured masks
        grouped.setdefault(tower, {})[kind] = value
    if list(tower_names) == [""]:
        # a bare BlockView list: accept masks of exactly one tower, whatever its name
        if len(grouped) > 1:
            raise MaskError(f"masks cover towers {sorted(grouped)}; pass a mapping of tower name to views")
        return {"": next(iter(grouped.values()), {})}
    unknown = sorted(set(grouped) - set(tower_names))
    if unknown:
        raise MaskError(f"masks name tower(s) {unknown}, expected only {sorted(tower_names)}")
    return grouped


def masked_macs(towers: TowersLike, masks: Mapping[str, MaskLike], metric: str = "mac") -> int:
    """Prunable cost that remains under ``masks`` (non-zero entries count as kept).

    A tower or mask kind (head / neuron) missing from ``masks`` counts as dense.
    """
    views_by_tower = as_tower_views(towers)
    grouped = _masks_by_tower(masks, list(views_by_tower))
    total = 0
    for name, views in views_by_tower.items():
        tower_masks = grouped.get(name, {})
        label = f"{name}." if name else ""
        heads = (kept_counts(tower_masks["head"], [v.num_heads for v in views], f"{label}head")
                 if "head" in tower_masks else [v.num_heads for v in views])
        neurons = (kept_counts(tower_masks["neuron"], [v.ffn_dim for v in views], f"{label}neuron")
                   if "neuron" in tower_masks else [v.ffn_dim for v in views])
        for view, h, n in zip(views, heads, neurons):
            head_cost, neuron_cost = unit_costs(view, metric)
            total += h * head_cost + n * neuron_cost
    return total


def kept_fraction(towers: TowersLike, masks: Mapping[str, MaskLike], metric: str = "mac") -> float:
    """Kept share of the prunable cost of the given towers under ``masks`` (the search constraint)."""
    dense = prunable_macs(towers, metric)
    if dense == 0:
        raise MaskError("the given towers have no prunable heads or neurons")
    return masked_macs(towers, masks, metric) / dense


# ---------------------------------------------------------------------------------------------
# outside the budget
# ---------------------------------------------------------------------------------------------
def non_prunable_macs(views: Sequence[BlockView], embed_dim: int, patch_size: int | None = None,
                      in_channels: int = 3, num_patches: int | None = None,
                      hidden: int | None = None) -> dict[str, int]:
    """MACs outside the pruning budget, by part: ``{"patch_embed", "projection", "total"}``.

    * patch embedding (vision towers; pass ``patch_size``): ``num_patches · in_channels · p² · d``, with
      ``num_patches`` defaulting to ``tokens - 1`` (one class token);
    * final projection of the pooled token: ``d · embed_dim``.

    Token embeddings (a lookup), LayerNorm and softmax cost no multiply-accumulates worth counting here.
    """
    views = list(views)
    if hidden is None:
        if not views:
            raise ParamError("non_prunable_macs needs at least one block view or an explicit hidden width")
        hidden = views[0].hidden
    patch_embed = 0
    if patch_size is not None:
        if num_patches is None:
            if not views:
                raise ParamError("non_prunable_macs needs block views or num_patches for the patch embedding")
            num_patches = views[0].tokens - 1
        patch_embed = num_patches * in_channels * patch_size * patch_size * hidden
    projection = hidden * embed_dim
    return {"patch_embed": patch_embed, "projection": projection, "total": patch_embed + projection}
