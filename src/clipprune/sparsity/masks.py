"""Mask-type helpers: N:M masks from scores, pattern checks, sparsity counts, exact global selection."""
from __future__ import annotations

import torch

from clipprune.errors import MaskError

from .config import MaskType


def check_alignment(name: str, weight: torch.Tensor, mask: MaskType) -> None:
    """block4 and N:M groups run along the input dimension: it must be a multiple of the group size."""
    align = mask.alignment
    if align > 1 and weight.shape[-1] % align:
        raise MaskError(f"sparsity.mask_type={mask.name}: layer {name} has {weight.shape[-1]} inputs, "
                        f"not a multiple of {align}")


def nm_mask_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask (bool, shape of ``scores``): in every ``m`` consecutive entries of the last dim keep the ``n``
    highest scores (ties: the earlier entry is kept)."""
    groups = scores.reshape(-1, m)
    # stable descending order: argsort of the negated scores keeps equal scores in index order
    order = torch.argsort(-groups, dim=1, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)


def holds_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every ``m`` consecutive weights along the input dim hold at most ``n`` nonzeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(1) <= n).all())


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def smallest_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks (shapes of ``scores``) selecting the ``k`` smallest entries over all tensors together.

    Exactly ``k`` entries are selected; ties are broken by position (earlier tensor, then earlier index),
    so a tensor whose rows are non-decreasing is selected as a prefix of each row.
    """
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot select {k} of {flat.numel()} entries")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(chosen[start:start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out
