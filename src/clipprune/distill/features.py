"""Which parameters distillation trains, and how much of a model pruning kept.

The features the token loss compares (``ClipModel.vision_tokens``) and a tower's parameters
(``ClipModel.tower_parameters``) are the model family's, on its adapter.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ..models.base import ClipModel, unique_parameters


def top_block_parameters(model: ClipModel, tower: str, count: int) -> list[nn.Parameter]:
    """Parameters of the last ``count`` transformer blocks of a tower."""
    blocks = list(model.towers[tower].blocks())
    chosen = blocks[len(blocks) - count:] if count > 0 else []
    return unique_parameters(p for block in chosen for p in block.parameters())


def prunable_param_count(model: ClipModel, tower: str) -> int:
    """Parameters of the attention and MLP sub-blocks of a tower (what head / neuron pruning removes)."""
    tower_view = model.towers[tower]
    total = 0
    for i in range(len(tower_view.blocks())):
        for part in (tower_view.attention(i), tower_view.mlp(i)):
            if hasattr(part, "out_proj") or hasattr(part, tower_view.layout.fc2):
                total += sum(p.numel() for p in part.parameters())
    return total


def keep_ratio(student: ClipModel, dense: ClipModel, towers) -> float:
    """Kept share of the prunable parameters of ``towers`` (pruned model vs its dense original)."""
    kept = sum(prunable_param_count(student, t) for t in towers)
    full = sum(prunable_param_count(dense, t) for t in towers)
    return kept / full if full else 1.0


def named_trainables(model: ClipModel, params) -> Iterator[tuple[str, nn.Parameter]]:
    """(state-dict name, parameter) for the given parameters, in the model's own order."""
    wanted = {id(p) for p in params}
    for name, p in model.module.named_parameters():
        if id(p) in wanted:
            yield name, p
