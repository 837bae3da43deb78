"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with the Hessian of the layer inputs.

For a layer ``y = W x`` the loss ``‖W X − Ŵ X‖²`` has the same Hessian ``H = 2 X Xᵀ`` for every output row,
so one ``[in, in]`` matrix per layer serves all rows (``X``: every calibration token reaching the layer,
computed block by block on the partly pruned model, ``inputs.prune_sequentially``). Dampened by
``λ = hessian_damp · mean(diag H)`` (the factor 2 cancels). With ``U`` the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = UᵀU``) the columns are swept left to right; at column ``j`` the rows to prune there
have error ``e = w_j / U_jj`` and every later column takes the OBS correction ``−e · U[j, j:]`` (row ``j`` of
``U`` is row ``j`` of the inverse Hessian of the columns not yet fixed, divided by the square root of its
diagonal), so each pruned weight is compensated by the columns after it.

Columns go in blocks of ``BLOCK_COLUMNS`` (the paper's 128, rounded down to a multiple of the mask
group): the corrections inside a block are applied column by column and those of the block to the columns
after it in one product (the paper's lazy batch update, the same arithmetic). The mask is chosen
adaptively when a block is reached, from the weights updated so far: unstructured / block4 prune the
``round(target · units)`` units of the block (all rows together) with the least ``w² / U_jj²`` (block4:
the sum over the 4); N:M picks, when a group of M columns is reached, the N to keep in each row. So each
layer meets the target to within half a unit per block. Weights already zero (pruned by an earlier
``num_recomputations`` step) are pruned first, so the mask only grows.
"""
from __future__ import annotations

import torch

from clipprune.errors import ClipPruneError, ParamError

from .cap import effective_block_size
from .config import MaskType, SparsityConfig
from .inputs import InputSource, prune_at_targets
from .masks import check_alignment, nm_mask_from_scores
from .registry import SparsityResult, register_method

BLOCK_COLUMNS = 128  # the paper's block size for both the lazy update and the mask selection


def inverse_hessian_factor(gram: torch.Tensor, damp: float, name: str = "layer") -> torch.Tensor:
    """Upper ``U`` with ``(X Xᵀ + λI)⁻¹ = UᵀU``, ``λ = damp · mean(diag X Xᵀ)``, in float64."""
    gram = gram.to(torch.float64)
    mean_diagonal = float(gram.diagonal().mean())
    if not mean_diagonal > 0:
        raise ClipPruneError(f"sparsity: layer {name} received only zero inputs on the calibration data; "
                             f"SparseGPT has no Hessian to prune it with")
    hessian = gram + damp * mean_diagonal * torch.eye(gram.shape[0], dtype=torch.float64)
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info:
        raise ParamError(f"sparsity.hessian_damp is too small for layer {name}: its damped input Hessian is not "
                         f"positive definite in float64; raise sparsity.hessian_damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def sparsegpt_prune(weight: torch.Tensor, upper: torch.Tensor, mask: MaskType, target: float | None,
                    block_columns: int = BLOCK_COLUMNS) -> torch.Tensor:
    """``weight [out, in]`` (float64) pruned by the column sweep (see module docstring); ``target`` unused
    for N:M."""
    w = weight.to(torch.float64).clone()
    rows, cols = w.shape
    already = weight == 0
    group = mask.group if mask.kind != "nm" else 1
    block_columns = effective_block_size(block_columns, mask)
    for start in range(0, cols, block_columns):
        end = min(start + block_columns, cols)
        block, factor = w[:, start:end], upper[start:end, start:end]  # block: a view, swept in place
        diag = factor.diagonal()
        if mask.kind == "nm":
            prune = torch.zeros_like(block, dtype=torch.bool)
        else:
            scores = (block.pow(2) / diag.pow(2)).reshape(rows, -1, group).sum(2)
            scores[already[:, start:end].reshape(rows, -1, group).all(2)] = -1.0  # below every real score
            chosen = torch.argsort(scores.reshape(-1), stable=True)[: round(target * scores.numel())]
            prune = torch.zeros(scores.numel(), dtype=torch.bool)
            prune[chosen] = True
            prune = prune.reshape(rows, -1).repeat_interleave(group, dim=1)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if mask.kind == "nm" and j % mask.m == 0:
                scores = block[:, j:j + mask.m].pow(2) / diag[j:j + mask.m].pow(2)
                prune[:, j:j + mask.m] = ~nm_mask_from_scores(scores, mask.n, mask.m)
            errors[:, j] = block[:, j] * prune[:, j] / diag[j]
            block[:, j:] -= errors[:, j:j + 1] * factor[j, j:].unsqueeze(0)
            block[:, j] = torch.where(prune[:, j], 0.0, block[:, j])
        w[:, end:] -= errors @ upper[start:end, end:]
    return w


@register_method("sparsegpt", source="inputs")
def sparsegpt_sparsify(layers, config: SparsityConfig, inputs: InputSource,
                       progress: bool = True) -> SparsityResult:
    """SparseGPT at every target of ``config``, each target on its own sequential pass."""
    mask = config.mask
    for name, layer in layers.items():
        check_alignment(name, layer.weight, mask)

    def prune_layer(target):
        def prune(name, weight, gram):
            upper = inverse_hessian_factor(gram, config.hessian_damp, name)
            return sparsegpt_prune(weight, upper, mask, target).float()
        return prune

    weights = prune_at_targets(list(layers), config, inputs, "gram", prune_layer, "sparsegpt")
    return SparsityResult(weights, _meta(config, inputs))


def _meta(config: SparsityConfig, inputs: InputSource) -> dict:
    return {"allocation": "per group (N:M)" if config.mask.kind == "nm" else "per block of columns",
            "block_columns_used": effective_block_size(BLOCK_COLUMNS, config.mask),
            "num_samples_used": inputs.num_samples, "calibration_passes": inputs.passes}
