"""Global magnitude pruning: the smallest |w| over all layers (groups of 4 by their L2 norm; N:M per group)."""
from __future__ import annotations

import torch

from .config import SparsityConfig
from .masks import check_alignment, nm_mask_from_scores, smallest_k
from .registry import SparsityResult, register_method


@register_method("magnitude", needs_data=False)
def magnitude_sparsify(layers, config: SparsityConfig, grads=None, progress: bool = True) -> SparsityResult:
    """Zero the globally smallest weights (unstructured, block4) or the M−N smallest of every N:M group."""
    mask = config.mask
    weights = {name: layer.weight.detach().to("cpu", torch.float32) for name, layer in layers.items()}
    for name, w in weights.items():
        check_alignment(name, w, mask)
    out: dict[float, dict[str, torch.Tensor]] = {}
    if mask.kind == "nm":
        pruned = {name: w * nm_mask_from_scores(w.abs(), mask.n, mask.m) for name, w in weights.items()}
        return SparsityResult({t: pruned for t in config.targets}, {"allocation": "per group (N:M)"})
    # unit scores: |w| or the L2 norm of each group of 4 consecutive weights along the input dim
    scores = [w.reshape(-1, mask.group).pow(2).sum(1) for w in weights.values()]
    units = sum(s.numel() for s in scores)
    for target in config.targets:
        chosen = smallest_k(scores, round(target * units))
        out[target] = {name: w * ~c.repeat_interleave(mask.group).reshape(w.shape)
                       for (name, w), c in zip(weights.items(), chosen)}
    return SparsityResult(out, {"allocation": "global"})
