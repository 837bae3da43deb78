"""FastCAP: one Fisher shared by all rows of a layer, and a SparseGPT-style column sweep.

The input dimension of a layer is cut into chunks of ``B`` columns. For chunk ``c`` one ``B×B`` Fisher is
shared by every row: ``F_c = damp·I + 1/(m·rows) Σ_samples Σ_rows g_r,c g_r,cᵀ`` (the row gradients
averaged), so a layer needs ``in × B`` numbers instead of ``numel × B``. With ``U`` the upper Cholesky
factor of ``F_c⁻¹`` (``F_c⁻¹ = UᵀU``), the columns of a chunk are processed left to right; pruning column
``j`` of a row with error ``e = w_j / U_jj`` updates the later columns by ``−e·U[j, j:]``, which is OBS for
the eliminated weights with the row-shared Fisher. The saliency of a weight is ``w_j² / (2 U_jj²)``.

Masks: unstructured / block4 (group saliency = sum of its 4) are chosen up front by a global threshold over
all layers' saliencies (loss units, comparable across layers); N:M is chosen during the sweep from the
updated weights, M columns at a time (SparseGPT's adaptive N:M selection).
"""
from __future__ import annotations

import math

import torch

from clipprune.progress import progress_bar

from .config import MaskType, SparsityConfig
from .fisher import COMPUTE_DTYPE, cholesky
from .masks import check_alignment, nm_mask_from_scores, smallest_k
from .registry import GradientSource, SparsityResult, register_method

ROW_CHUNK = 8192  # gradient rows (samples × out) summed together in float64


def shared_fishers(layers, grads: GradientSource, block_size: int, damp: float, names: list[str]) \
        -> dict[str, torch.Tensor]:
    """Per layer ``[chunks, B, B]`` damped row-shared Fisher from one calibration pass, summed in float64
    (``ROW_CHUNK`` gradient rows at a time, so the float64 copy stays small)."""
    sums = {}
    for batch in grads.stream(names):
        for name in names:
            g = batch[name]  # [rows, out, in]
            flat = g.reshape(-1, g.shape[-1])
            for start in range(0, flat.shape[0], ROW_CHUNK):
                chunks = _column_chunks(flat[start:start + ROW_CHUNK].to(COMPUTE_DTYPE), block_size)
                part = torch.einsum("rci,rcj->cij", chunks, chunks)  # [chunks, B, B]
                sums[name] = part if name not in sums else sums[name] + part
    out = {}
    for name in names:
        rows = layers[name].weight.shape[0]
        fisher = sums[name] / (grads.num_grads * rows)
        out[name] = fisher + damp * torch.eye(block_size, dtype=COMPUTE_DTYPE)
    return out


def _column_chunks(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[rows, in]`` -> ``[rows, chunks, B]`` (zero-padded columns)."""
    cols = matrix.shape[-1]
    pad = math.ceil(cols / block_size) * block_size - cols
    if pad:
        matrix = torch.nn.functional.pad(matrix, (0, pad))
    return matrix.reshape(matrix.shape[0], -1, block_size)


def cholesky_of_inverse(fisher: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``F⁻¹ = UᵀU``, batched over chunks, in float64: with low-rank gradients and a small
    damp, ``F`` is too ill-conditioned to factor in float32."""
    fisher = fisher.to(COMPUTE_DTYPE)
    inverse = torch.cholesky_inverse(cholesky(fisher))
    return cholesky(inverse.transpose(1, 2)).transpose(1, 2)


def saliencies(weight: torch.Tensor, upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[out, in]`` OBS saliency ``w² / (2 U_jj²)`` of every weight."""
    diag = upper.diagonal(dim1=1, dim2=2).reshape(-1)[: weight.shape[1]]  # [in] (chunks laid end to end)
    return weight.pow(2) / (2 * diag.pow(2))


def column_sweep(weight: torch.Tensor, upper: torch.Tensor, block_size: int, prune: torch.Tensor | None,
                 mask: MaskType) -> torch.Tensor:
    """Prune ``weight [out, in]`` column by column with OBS updates inside each chunk.

    ``prune`` (bool ``[out, in]``) is the fixed mask; None with N:M masks (chosen during the sweep).
    """
    cols = weight.shape[1]
    w = _column_chunks(weight.to(upper.dtype).clone(), block_size)  # [out, chunks, B], a copy: swept in place
    pruned = None if prune is None else _column_chunks(prune.to(upper.dtype), block_size).bool()
    if prune is None:
        pruned = torch.zeros_like(w, dtype=torch.bool)
    diag = upper.diagonal(dim1=1, dim2=2)  # [chunks, B]
    for j in range(block_size):
        if mask.kind == "nm" and j % mask.m == 0:
            group = w[:, :, j:j + mask.m]
            scores = group.pow(2) / diag[:, j:j + mask.m].pow(2)
            pruned[:, :, j:j + mask.m] = ~nm_mask_from_scores(scores, mask.n, mask.m)
        error = w[:, :, j] * pruned[:, :, j] / diag[:, j]  # [out, chunks]
        w[:, :, j:] -= error.unsqueeze(2) * upper[:, j, j:].unsqueeze(0)
        w[:, :, j] = torch.where(pruned[:, :, j], 0, w[:, :, j])
    return w.reshape(w.shape[0], -1)[:, :cols].to(torch.float32).contiguous()


@register_method("fastcap")
def fastcap_sparsify(layers, config: SparsityConfig, grads: GradientSource,
                     progress: bool = True) -> SparsityResult:
    """FastCAP one-shot pruning of ``layers`` at every target of ``config`` (see module docstring)."""
    mask = config.mask
    for name, layer in layers.items():
        check_alignment(name, layer.weight, mask)
    from .cap import effective_block_size

    names = list(layers)
    block_size = effective_block_size(config.fisher_block_size, mask)
    block_size = min(block_size, max(layers[n].weight.shape[1] for n in names))
    # a layer's shared Fishers are small (in × B numbers): auto and null both mean one calibration pass
    chunk = config.chunk_layers if isinstance(config.chunk_layers, int) else len(names)
    uppers = {}
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        fishers = shared_fishers(layers, grads, block_size, config.damp, part)
        uppers.update({n: cholesky_of_inverse(f) for n, f in fishers.items()})
    weights = {n: layers[n].weight.detach().to("cpu", COMPUTE_DTYPE) for n in names}
    out: dict[float, dict[str, torch.Tensor]] = {}
    if mask.kind == "nm":
        pruned = {n: column_sweep(weights[n], uppers[n], block_size, None, mask)
                  for n in progress_bar(names, desc="fastcap sweep", unit="layer", enabled=progress)}
        return SparsityResult({t: pruned for t in config.targets}, _meta(config, block_size, grads, uppers))
    scores = [saliencies(weights[n], uppers[n], block_size).reshape(-1, mask.group).sum(1) for n in names]
    units = sum(s.numel() for s in scores)
    for target in config.targets:
        chosen = smallest_k(scores, round(target * units))
        out[target] = {}
        for n, c in progress_bar(list(zip(names, chosen)), desc=f"fastcap sweep {target}", unit="layer",
                                 enabled=progress):
            prune = c.repeat_interleave(mask.group).reshape(weights[n].shape)
            out[target][n] = column_sweep(weights[n], uppers[n], block_size, prune, mask)
    return SparsityResult(out, _meta(config, block_size, grads, uppers))


def _meta(config, block_size, grads, uppers) -> dict:
    return {"allocation": "per group (N:M)" if config.mask.kind == "nm" else "global (OBS saliency)",
            "fisher_block_size_used": block_size, "num_grads_used": grads.num_grads,
            "calibration_passes": grads.passes,
            "fisher_bytes": sum(u.numel() * u.element_size() for u in uppers.values())}
