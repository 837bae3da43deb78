"""Wanda against an explicit per-row ranking of |W_ij|·‖X_j‖₂ (brute force, float64)."""
import math

import pytest
import torch

from clipprune.sparsity import parse_mask_type
from clipprune.sparsity.wanda import row_counts, wanda_prune


def _inputs(tokens=40, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    return x * torch.linspace(0.1, 3.0, cols, dtype=torch.float64)  # features of different scales


def _brute_force_wanda(w, x, target=None, group=1, nm=None):
    rows, cols = w.shape
    norms = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(cols)]
    out = w.clone()
    if nm is not None:
        n, m = nm
        for r in range(rows):
            for start in range(0, cols, m):
                ranked = sorted(range(start, start + m), key=lambda j: (-abs(float(w[r, j])) * norms[j], j))
                for j in ranked[n:]:
                    out[r, j] = 0.0
        return out
    total = round(target * rows * (cols // group))
    for r in range(rows):
        count = total // rows + (1 if r < total % rows else 0)
        units = [(sum((abs(float(w[r, j])) * norms[j]) ** 2 for j in range(u, u + group)), u)
                 for u in range(0, cols, group)]
        for _, u in sorted(units)[:count]:
            out[r, u:u + group] = 0.0
    return out


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("mask_type,group", [("unstructured", 1), ("block4", 4)])
def test_unstructured_and_block4_match_the_per_row_ranking(target, mask_type, group):
    w = torch.randn(7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = _inputs()
    pruned = wanda_prune(w, x.pow(2).sum(0), parse_mask_type(mask_type), target)
    assert torch.equal(pruned, _brute_force_wanda(w, x, target, group))
    assert int((pruned == 0).sum()) == round(target * w.numel() / group) * group  # the layer meets the target


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_matches_the_per_group_ranking(n, m):
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = _inputs(seed=3)
    pruned = wanda_prune(w, x.pow(2).sum(0), parse_mask_type(f"{n}:{m}"), None)
    assert torch.equal(pruned, _brute_force_wanda(w, x, nm=(n, m)))


def test_the_input_norm_changes_the_ranking_not_only_the_magnitude():
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    sq_norm = torch.tensor([100.0, 1.0], dtype=torch.float64)  # |w|·‖x‖: 10 vs 2
    assert torch.equal(wanda_prune(w, sq_norm, parse_mask_type("unstructured"), 0.5),
                       torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_row_counts_are_exact_and_never_fall_as_the_target_rises():
    previous = torch.zeros(7, dtype=torch.long)
    for target in torch.linspace(0.01, 0.99, 99).tolist():
        counts = row_counts(7, 13, target)
        assert int(counts.sum()) == round(target * 91)
        assert int(counts.max() - counts.min()) <= 1
        assert bool((counts >= previous).all())
        previous = counts


def test_pruning_a_pruned_weight_again_only_adds_zeros():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sq_norm = _inputs(seed=5).pow(2).sum(0)
    mask = parse_mask_type("unstructured")
    half = wanda_prune(w, sq_norm, mask, 0.5)
    more = wanda_prune(half, sq_norm, mask, 0.8)
    assert bool(((half == 0) <= (more == 0)).all())
    assert int((more == 0).sum()) == round(0.8 * w.numel())
