"""Helpers for the tuning tests: direct (hook-based) measurement of a block's reconstruction errors."""
from __future__ import annotations

import contextlib

import torch

from clipprune.models import apply_masks
from clipprune.tuning.capture import block_parts, record_input, record_output, text_valid_positions


@torch.no_grad()
def block_streams(model, tower: str, layer: int, images, tokens, masks=None) -> dict[str, torch.Tensor]:
    """Post-attention stream ``h`` and block output ``y`` of one block, as ``[valid tokens, hidden]``.

    Computed with a full forward pass of the tower (masked when ``masks`` is given), independently of
    the tuner's block-by-block propagation.
    """
    parts = block_parts(model.towers[tower], layer)
    seen: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        if masks is not None:
            stack.enter_context(apply_masks(model, masks))
        stack.enter_context(record_input(parts.norm2, seen, "h"))
        stack.enter_context(record_output(parts.block, seen, "y"))
        if tower == "vision":
            model.encode_image(images)
        else:
            model.encode_text(tokens)
    if tower == "text":
        valid = text_valid_positions(model, tokens)
        return {k: v[valid] for k, v in seen.items()}
    return {k: v.reshape(-1, v.shape[-1]) for k, v in seen.items()}


def mean_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ_tokens ‖a − b‖² / tokens (the tuner's per-token reconstruction error), in float64."""
    return float((a.double() - b.double()).pow(2).sum() / a.shape[0])


def masks_at_stage(original: dict, tuned: dict, tower: str, layer: int, kind: str, tuned_now: bool) -> dict:
    """The student masks the tuner used for ``(tower, layer, kind)``: earlier sub-blocks tuned, later binary.

    ``tuned_now`` selects whether the sub-block itself has its tuned (after) or original (before) row.
    """
    out = {}
    for key, mask in original.items():
        row_tower, row_kind = key.split(".")
        mask = mask.clone()
        if row_tower == tower:
            done = layer + (1 if (row_kind == "head" and kind == "neuron") or tuned_now and row_kind == kind else 0)
            mask[:done] = tuned[key][:done]
        out[key] = mask
    return out
