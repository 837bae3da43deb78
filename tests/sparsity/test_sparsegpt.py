"""SparseGPT against a direct OBS sweep written from the paper's formula (explicit inverses, float64).

FastCAP is not the same computation (its curvature is the row-averaged empirical Fisher of the loss
gradients, block-diagonal in chunks of ``fisher_block_size`` columns, with one global mask chosen up front;
SparseGPT's is the full ``X Xᵀ`` of the layer inputs with a mask chosen per block of columns during the
sweep), so SparseGPT is a method of its own, tested here.
"""
import pytest
import torch

from clipprune.errors import ClipPruneError
from clipprune.sparsity import parse_mask_type
from clipprune.sparsity.sparsegpt import inverse_hessian_factor, sparsegpt_prune


def _problem(rows=6, cols=12, tokens=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                   dtype=torch.float64)
    return w, x.T @ x  # correlated inputs: the OBS correction matters


def _damped(gram, damp):
    return gram + damp * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)


def _brute_force_sparsegpt(w, hessian, block, target=None, group=1, nm=None):
    """Row by row, column by column: the inverse Hessian of the columns not yet fixed is inverted directly;
    a pruned weight w_j moves the free columns by −w_j / [H_F⁻¹]_00 · [H_F⁻¹]_0,: and becomes 0. The mask of
    each block of columns is chosen when it is reached, from the weights as updated so far."""
    w = w.clone()
    rows, cols = w.shape

    def inv_from(c):
        return torch.linalg.inv(hessian[c:, c:])

    def score(r, c):
        return float(w[r, c]) ** 2 / float(inv_from(c)[0, 0])

    prune = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        if nm is None:
            units = [(sum(score(r, c) for c in range(u, u + group)), r, u)
                     for r in range(rows) for u in range(start, end, group)]
            order = sorted(range(len(units)), key=lambda i: (units[i][0], i))
            for i in order[:round(target * len(units))]:
                _, r, u = units[i]
                prune[r, u:u + group] = True
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                n, m = nm
                for r in range(rows):
                    ranked = sorted(range(j, j + m), key=lambda c: (-score(r, c), c))
                    for c in ranked[n:]:
                        prune[r, c] = True
            inverse = inv_from(j)
            for r in range(rows):
                if prune[r, j]:
                    w[r, j:] -= float(w[r, j]) / float(inverse[0, 0]) * inverse[0]
                    w[r, j] = 0.0
    return w


@pytest.mark.parametrize("block", [4, 8, 12])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_unstructured_matches_the_direct_obs_sweep(block, target):
    w, gram = _problem()
    upper = inverse_hessian_factor(gram, 0.01)
    ours = sparsegpt_prune(w, upper, parse_mask_type("unstructured"), target, block_columns=block)
    reference = _brute_force_sparsegpt(w, _damped(gram, 0.01), block, target)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def test_block4_matches_the_direct_obs_sweep():
    w, gram = _problem(cols=16, seed=1)
    ours = sparsegpt_prune(w, inverse_hessian_factor(gram, 0.01), parse_mask_type("block4"), 0.5, block_columns=8)
    reference = _brute_force_sparsegpt(w, _damped(gram, 0.01), 8, 0.5, group=4)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    zeros = (ours.reshape(-1, 4) == 0).sum(1)
    assert bool(((zeros == 0) | (zeros == 4)).all())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_nm_matches_the_direct_obs_sweep_with_adaptive_groups(n, m):
    w, gram = _problem(seed=2)
    ours = sparsegpt_prune(w, inverse_hessian_factor(gram, 0.01), parse_mask_type(f"{n}:{m}"), None,
                           block_columns=8)
    reference = _brute_force_sparsegpt(w, _damped(gram, 0.01), 8, nm=(n, m))
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    assert bool(((ours.reshape(-1, m) != 0).sum(1) == n).all())


def test_the_factor_is_the_cholesky_of_the_damped_inverse_hessian():
    _, gram = _problem(seed=3)
    upper = inverse_hessian_factor(gram, 0.05)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(_damped(gram, 0.05)), rtol=1e-9, atol=1e-12)
    assert torch.equal(upper, upper.triu())


def test_the_update_lowers_the_output_error_versus_zeroing_the_same_weights():
    w, gram = _problem(cols=24, tokens=60, seed=4)
    ours = sparsegpt_prune(w, inverse_hessian_factor(gram, 1e-6), parse_mask_type("unstructured"), 0.5)
    zeroed = w * (ours != 0)

    def error(new):
        diff = new - w
        return float(torch.einsum("ri,ij,rj->", diff, gram, diff))  # ‖(Ŵ − W) X‖²

    assert error(ours) < 0.8 * error(zeroed)


def test_weights_already_zero_are_pruned_first():
    w, gram = _problem(seed=5)
    upper = inverse_hessian_factor(gram, 0.01)
    mask = parse_mask_type("unstructured")
    half = sparsegpt_prune(w, upper, mask, 0.5)
    more = sparsegpt_prune(half, upper, mask, 0.75)
    assert bool(((half == 0) <= (more == 0)).all())


def test_a_layer_with_only_zero_inputs_is_an_error_naming_it():
    with pytest.raises(ClipPruneError, match="layer vision.0.fc1 received only zero inputs"):
        inverse_hessian_factor(torch.zeros(4, 4, dtype=torch.float64), 0.01, "vision.0.fc1")
