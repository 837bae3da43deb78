"""Model complexity for reports: MACs (prunable and not), parameters, and on-disk size."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from clipprune import flops
from clipprune.errors import DataError
from clipprune.evaluate.zeroshot import model_device
from clipprune.models.base import ClipModel

GIGA = 1e9


def find_patch_embedding(module: nn.Module) -> nn.Conv2d | None:
    """The patch-embedding convolution: the first Conv2d whose stride equals its (non-1×1) kernel size."""
    for sub in module.modules():
        if (isinstance(sub, nn.Conv2d) and tuple(sub.kernel_size) == tuple(sub.stride)
                and max(sub.kernel_size) > 1):
            return sub
    return None


@torch.no_grad()
def infer_embed_dim(model: ClipModel) -> int:
    """Width of the joint embedding space, read off the text encoder's output for one short prompt."""
    tokens = model.tokenizer(["a"]).to(model_device(model))
    was_training = model.module.training
    model.module.eval()
    try:
        return int(model.encode_text(tokens).shape[-1])
    finally:
        model.module.train(was_training)


def tower_complexity(model: ClipModel, tower: str, masks: Mapping[str, torch.Tensor] | None = None,
                     embed_dim: int | None = None, patch_size: int | None = None,
                     in_channels: int | None = None) -> dict:
    """Complexity of one tower: GMACs (prunable, non-prunable, total), prunable and tower parameters.

    With ``masks`` the prunable part counts only kept heads/neurons (a masked, not yet exported model).
    For the vision tower the patch embedding is found in the model (a Conv2d with stride = kernel) unless
    ``patch_size`` / ``in_channels`` are given.
    """
    if tower not in model.towers:
        raise DataError(f"model {model.name!r} has no tower {tower!r} (towers: {sorted(model.towers)})")
    views = model.towers[tower].block_views()
    single = {tower: views}
    tower_masks = {k: v for k, v in (masks or {}).items() if k.rpartition(".")[0] == tower}
    prunable_dense = flops.prunable_macs(single)
    prunable = flops.masked_macs(single, tower_masks) if tower_masks else prunable_dense
    params_dense = flops.prunable_macs(single, "params")
    params_kept = flops.masked_macs(single, tower_masks, "params") if tower_masks else params_dense

    num_patches = None
    if tower == "vision" and patch_size is None:
        conv = find_patch_embedding(model.module)
        if conv is not None:
            patch_size = int(conv.kernel_size[0])
            in_channels = in_channels or int(conv.in_channels)
    if tower == "vision" and patch_size is not None and getattr(model, "image_size", None):
        num_patches = (int(model.image_size) // patch_size) ** 2
    outside = flops.non_prunable_macs(
        views, embed_dim if embed_dim is not None else infer_embed_dim(model),
        patch_size=patch_size if tower == "vision" else None, in_channels=in_channels or 3,
        num_patches=num_patches)
    return {
        "prunable_gmacs": prunable / GIGA,
        "prunable_gmacs_dense": prunable_dense / GIGA,
        "non_prunable_gmacs": outside["total"] / GIGA,
        "total_gmacs": (prunable + outside["total"]) / GIGA,
        "kept_mac_fraction": prunable / prunable_dense if prunable_dense else 1.0,
        "prunable_params": params_kept,
        "prunable_params_dense": params_dense,
        "params": int(model.tower_param_count(tower)),
    }


def model_complexity(model: ClipModel, masks: Mapping[str, torch.Tensor] | None = None,
                     embed_dim: int | None = None, patch_size: int | None = None) -> dict:
    """Per-tower :func:`tower_complexity` plus model totals (all parameters, non-zero parameters, GMACs).

    ``params`` counts every parameter of ``model.module``; ``nonzero_params`` counts non-zero entries
    (what weight-level sparsity removes). Masked-out heads/neurons are not subtracted from either; the
    masked count is ``prunable_params`` per tower.
    """
    embed_dim = embed_dim if embed_dim is not None else infer_embed_dim(model)
    towers = {name: tower_complexity(model, name, masks, embed_dim, patch_size) for name in model.towers}
    params = sum(p.numel() for p in model.module.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.module.parameters())
    return {
        "towers": towers,
        "total_gmacs": sum(t["total_gmacs"] for t in towers.values()),
        "prunable_gmacs": sum(t["prunable_gmacs"] for t in towers.values()),
        "params": int(params),
        "nonzero_params": int(nonzero),
        "embed_dim": embed_dim,
    }


def file_size_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or the summed size of all files under a directory (symlinks not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    raise DataError(f"{path}: no such file or directory to measure")


def file_size_mb(path: str | os.PathLike) -> float:
    """:func:`file_size_bytes` in megabytes (10^6 bytes)."""
    return file_size_bytes(path) / 1e6
