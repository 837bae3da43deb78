"""Physical pruning: remove masked heads / neurons and fold mask scales into the output projections.

The result computes exactly what the masked model computes (up to float rounding): a head's context is
scaled by its mask before ``out_proj``, which equals scaling ``out_proj``'s columns of that head; likewise
for a neuron and the second MLP linear's column. Units whose mask is 0 are sliced out; a sub-block with
nothing left becomes ``DroppedAttention`` / ``DroppedMLP`` (adds only the output bias, no compute).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .attention import DroppedAttention, DroppedMLP
from .base import ClipModel, EncoderTower
from .masks import parse_mask_key, validate_masks


def prune_model(model: ClipModel, masks: Mapping[str, torch.Tensor]) -> ClipModel:
    """A new, physically smaller model equivalent to ``model`` under ``masks``; ``model`` is untouched."""
    validate_masks(model, masks, "masks")
    pruned = model.copy()
    prune_in_place(pruned, masks)
    return pruned


@torch.no_grad()
def prune_in_place(model: ClipModel, masks: Mapping[str, torch.Tensor]) -> ClipModel:
    """Like ``prune_model`` but modifies ``model`` (masks must already be validated)."""
    for key, mask in masks.items():
        tower_name, kind = parse_mask_key(key)
        tower = model.towers[tower_name]
        mask = mask.detach()
        for layer in range(len(tower.blocks())):
            if kind == "head":
                prune_heads(tower, layer, mask[layer, :tower.num_heads(layer)])
            else:
                prune_neurons(tower, layer, mask[layer, :tower.ffn_dim(layer)])
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A new nn.Linear holding (copies of) the given weight and bias, on ``like``'s device and dtype."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=like.weight.device, dtype=like.weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.weight.requires_grad_(like.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(like.bias.requires_grad)
    new.train(like.training)
    return new


def prune_heads(tower: EncoderTower, layer: int, scales: torch.Tensor) -> None:
    """Keep heads with a nonzero scale in block ``layer``, folding the scales into ``out_proj``."""
    num_heads = tower.num_heads(layer)
    if num_heads == 0:
        return
    attn = tower.attention(layer)
    out_proj = attn.out_proj
    keep = torch.nonzero(scales.to(out_proj.weight.device) != 0).flatten()
    if keep.numel() == 0:
        dropped = DroppedAttention(tower.hidden, out_proj.bias).to(out_proj.weight.device, out_proj.weight.dtype)
        tower.set_attention(layer, dropped)
        return
    kept_scales = scales.to(out_proj.weight.device, out_proj.weight.dtype)[keep]
    if keep.numel() == num_heads and bool((kept_scales == 1).all()):
        return  # nothing to remove or fold
    old_index = torch.tensor(tower.head_index(layer), dtype=torch.long, device=out_proj.weight.device)
    head_dim = tower.head_dim
    rows = (keep[:, None] * head_dim + torch.arange(head_dim, device=keep.device)).flatten()
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(attn, name)
        bias = None if proj.bias is None else proj.bias[rows]
        setattr(attn, name, _linear(proj.weight[rows], bias, proj))
    column_scale = kept_scales.repeat_interleave(head_dim)
    attn.out_proj = _linear(out_proj.weight[:, rows] * column_scale, out_proj.bias, out_proj)
    new_index = old_index[keep]
    if "head_index" in attn._buffers:
        attn.head_index = new_index
    else:  # transformers' CLIPAttention: remember original head ids for re-export
        attn.register_buffer("head_index", new_index, persistent=False)
    attn.num_heads = int(keep.numel())


def prune_neurons(tower: EncoderTower, layer: int, scales: torch.Tensor) -> None:
    """Keep MLP neurons with a nonzero scale in block ``layer``, folding the scales into the second linear."""
    fc2 = tower.mlp_out_module(layer)
    if fc2 is None:
        return
    fc1 = tower.fc1(layer)
    keep = torch.nonzero(scales.to(fc2.weight.device) != 0).flatten()
    if keep.numel() == 0:
        tower.set_mlp(layer, DroppedMLP(tower.hidden, fc2.bias).to(fc2.weight.device, fc2.weight.dtype))
        return
    kept_scales = scales.to(fc2.weight.device, fc2.weight.dtype)[keep]
    if keep.numel() == fc2.in_features and bool((kept_scales == 1).all()):
        return
    mlp = tower.mlp(layer)
    setattr(mlp, tower.layout.fc1,
            _linear(fc1.weight[keep], None if fc1.bias is None else fc1.bias[keep], fc1))
    setattr(mlp, tower.layout.fc2, _linear(fc2.weight[:, keep] * kept_scales, fc2.bias, fc2))
