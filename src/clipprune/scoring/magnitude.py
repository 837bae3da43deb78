"""Weight-magnitude baseline: a unit's score is the L2 (or L1) norm of the weights that exist only for it.

Head h: its q, k and v projection rows and its out_proj columns. Neuron j: its fc1 row and fc2 column.
Biases are not counted. No data is needed (the loader is ignored) and no gradient rows are returned.
"""
from __future__ import annotations

import torch

from clipprune.errors import ClipPruneError
from clipprune.models.base import ClipModel
from clipprune.models.masks import mask_shape

from .registry import ScoreResult, register_criterion


def _power(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """|w|² for the L2 norm, |w| for L1 (summed per unit, then rooted by ``_finish``)."""
    w = weight.detach().double()
    return w.pow(2) if norm == "l2" else w.abs()


def _finish(total: torch.Tensor, norm: str) -> torch.Tensor:
    return total.sqrt() if norm == "l2" else total


def _head_norms(attention, heads: int, head_dim: int, norm: str = "l2") -> torch.Tensor:
    total = torch.zeros(heads, dtype=torch.float64)
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):  # rows [h*dh, (h+1)*dh)
        total += _power(proj.weight, norm).reshape(heads, head_dim, -1).sum((1, 2)).cpu()
    out = _power(attention.out_proj.weight, norm)  # columns [h*dh, (h+1)*dh)
    total += out.reshape(out.shape[0], heads, head_dim).sum((0, 2)).cpu()
    return _finish(total, norm)


def _neuron_norms(fc1: torch.nn.Linear, fc2: torch.nn.Linear, norm: str = "l2") -> torch.Tensor:
    total = _power(fc1.weight, norm).sum(1) + _power(fc2.weight, norm).sum(0)
    return _finish(total, norm).cpu()


@register_criterion("magnitude", needs_data=False)
def magnitude_scores(model: ClipModel, loader=None, *, towers, loss, granularity, progress,
                     norm: str = "l2") -> ScoreResult:
    """Weight norms (``norm``: l2 or l1, LFPR's magnitude baseline) per head and neuron; zero for padding of
    narrower (already pruned) blocks."""
    scores = {}
    for name in towers:
        tower = model.towers[name]
        if not hasattr(tower, "attention") or not hasattr(tower, "fc1"):
            raise ClipPruneError(f"score.criterion=magnitude needs block weights; tower {name} of {model.name} "
                                 f"does not expose its attention / MLP modules")
        heads = torch.zeros(mask_shape(model, name, "head"), dtype=torch.float64)
        neurons = torch.zeros(mask_shape(model, name, "neuron"), dtype=torch.float64)
        for layer, view in enumerate(tower.block_views()):
            if view.num_heads:
                heads[layer, :view.num_heads] = _head_norms(tower.attention(layer), view.num_heads, view.head_dim, norm)
            if view.ffn_dim:
                neurons[layer, :view.ffn_dim] = _neuron_norms(tower.fc1(layer), tower.mlp_out_module(layer), norm)
        scores[f"{name}.head"] = heads.float()
        scores[f"{name}.neuron"] = neurons.float()
    return ScoreResult(scores=scores, grads={}, meta={"loss": None, "norm": norm, "num_samples": 0,
                                                                  "num_batches": 0})
