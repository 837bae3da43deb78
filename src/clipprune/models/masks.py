"""Head / neuron masks: creation, validation, application by hooks, and the safetensors file format.

Masks are a dict of float tensors keyed ``"<tower>.head"`` (shape ``[layers, heads]``) and
``"<tower>.neuron"`` (``[layers, ffn_dim]``). Values are scales: 1 keeps a unit, 0 removes it, anything
else rescales it (tuned masks). For a model whose blocks were already pruned to different widths the
second dimension is the widest block; entries past a block's width must be 0.

Per-sample masks (``apply_sample_masks``) add a leading batch dimension, ``[batch, layers, units]``: sample
``b`` of a forward is scaled by ``mask[b]``, so one backward yields every sample's own mask gradient.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import MaskError, ParamError
from ..io import read_safetensors, save_safetensors
from .base import TOWERS, ClipModel

KINDS = ("head", "neuron")
_KEY = re.compile(r"^(?P<tower>[a-z_]+)\.(?P<kind>head|neuron)$")


def mask_key(tower: str, kind: str) -> str:
    return f"{tower}.{kind}"


def parse_mask_key(key: str) -> tuple[str, str]:
    """``"vision.head"`` -> ``("vision", "head")``; MaskError for anything else."""
    match = _KEY.match(key) if isinstance(key, str) else None
    if not match:
        raise MaskError(f"mask key {key!r} is malformed (expected '<tower>.head' or '<tower>.neuron')")
    return match["tower"], match["kind"]


def block_widths(model: ClipModel, tower: str, kind: str) -> list[int]:
    """Present heads (kind="head") or neurons (kind="neuron") of each block of a tower."""
    views = model.towers[tower].block_views()
    return [v.num_heads if kind == "head" else v.ffn_dim for v in views]


def mask_shape(model: ClipModel, tower: str, kind: str) -> tuple[int, int]:
    widths = block_widths(model, tower, kind)
    return len(widths), max(widths, default=0)


def _check_towers(model: ClipModel, towers: Iterable[str]) -> tuple[str, ...]:
    towers = (towers,) if isinstance(towers, str) else tuple(towers)
    unknown = [t for t in towers if t not in model.towers]
    if unknown or not towers:
        raise ParamError(f"towers must be a non-empty subset of {list(model.towers)}, got {list(towers)}")
    return towers


def full_masks(model: ClipModel, towers: Iterable[str] = TOWERS, requires_grad: bool = False,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All-ones masks (zeros in the padding of narrower pruned blocks) for the given towers.

    With ``requires_grad=True`` the tensors are leaves whose ``.grad`` collects ∂loss/∂mask when used
    with ``apply_masks`` (Fisher / Taylor scoring).
    """
    device = next(model.parameters()).device
    masks = {}
    for tower in _check_towers(model, towers):
        for kind in KINDS:
            widths = block_widths(model, tower, kind)
            mask = torch.zeros(len(widths), max(widths, default=0), dtype=dtype, device=device)
            for layer, width in enumerate(widths):
                mask[layer, :width] = 1.0
            masks[mask_key(tower, kind)] = mask.requires_grad_(requires_grad)
    return masks


def validate_masks(model: ClipModel, masks: Mapping[str, torch.Tensor], name: str = "masks") -> None:
    """Raise MaskError (one line, starting with ``name``) unless ``masks`` fit ``model``."""
    if not isinstance(masks, Mapping) or not masks:
        raise MaskError(f"{name}: expected a non-empty dict of mask tensors, got {type(masks).__name__}")
    valid = ", ".join(mask_key(t, k) for t in model.towers for k in KINDS)
    for key, mask in masks.items():
        try:
            tower, kind = parse_mask_key(key)
        except MaskError:
            tower = kind = None
        if tower not in model.towers:
            raise MaskError(f"{name}: unknown mask key {key!r} (expected keys among {valid})")
        if not isinstance(mask, torch.Tensor):
            raise MaskError(f"{name}: {key} must be a tensor, got {type(mask).__name__}")
        expected = mask_shape(model, tower, kind)
        if tuple(mask.shape) != expected:
            raise MaskError(f"{name}: {key} has shape {list(mask.shape)}, expected {list(expected)} "
                            f"([layers, {'heads' if kind == 'head' else 'ffn_dim'}]) for model {model.name}")
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            raise MaskError(f"{name}: {key} must be a float tensor, got {mask.dtype}")
        values = mask.detach()
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise MaskError(f"{name}: {key} contains non-finite values (NaN or inf)")
        for layer, width in enumerate(block_widths(model, tower, kind)):
            if width < expected[1] and bool((values[layer, width:] != 0).any()):
                raise MaskError(f"{name}: {key} layer {layer} has only {width} units, "
                                f"but nonzero entries past column {width}")


def check_scales(masks: Mapping[str, torch.Tensor], name: str, max_scale: float) -> None:
    """MaskError naming ``name`` unless every entry is 0, 1 or a scale within ``[-max_scale, max_scale]``.

    That is what the tune stage writes: least squares keeps the binary mask of a sub-block whose scales
    leave the range (``tune.max_scale``), so a mask read back with larger entries was not written by it.
    """
    for key, mask in masks.items():
        values = mask.detach().float()
        outside = (values.abs() > max_scale) & (values != 1)  # NaN compares False: validate_masks refuses it
        if bool(outside.any()):
            layer, unit = (int(i) for i in outside.nonzero()[0][-2:])  # [layers, units] (validated)
            raise MaskError(f"{name}: {key} layer {layer} unit {unit} holds the scale {float(values[layer, unit]):.4g}, "
                            f"outside [-{max_scale:g}, {max_scale:g}] (tune.max_scale); expected 0, 1 or a scale "
                            f"within it")


def _head_hook(mask: torch.Tensor, layer: int, head_dim: int):
    per_sample = mask.dim() == 3

    def hook(module, args):
        context = args[0]
        heads = context.shape[-1] // head_dim
        # index the leaf inside the hook so every forward builds a fresh graph back to the mask
        if per_sample:  # mask [batch, layers, heads]: sample b's context is scaled by mask[b]
            scale = _sample_scale(mask[:, layer, :heads], context, "head")[..., None]
        else:
            scale = mask[layer, :heads].to(device=context.device, dtype=context.dtype)[:, None]
        shaped = context.reshape(*context.shape[:-1], heads, head_dim) * scale
        return (shaped.reshape(context.shape),) + tuple(args[1:])

    hook.clipprune_mask_hook = True
    return hook


def _neuron_hook(mask: torch.Tensor, layer: int):
    per_sample = mask.dim() == 3

    def hook(module, args):
        hidden = args[0]
        if per_sample:
            scale = _sample_scale(mask[:, layer, :hidden.shape[-1]], hidden, "neuron")
        else:
            scale = mask[layer, :hidden.shape[-1]].to(device=hidden.device, dtype=hidden.dtype)
        return (hidden * scale,) + tuple(args[1:])

    hook.clipprune_mask_hook = True
    return hook


def _sample_scale(scale: torch.Tensor, activation: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample scales [batch, units] shaped to broadcast over a batch-first activation [batch, ..., units]."""
    if activation.dim() < 2 or activation.shape[0] != scale.shape[0]:
        raise MaskError(f"per-sample {kind} masks hold {scale.shape[0]} samples but the activation has shape "
                        f"{list(activation.shape)} (batch first expected)")
    scale = scale.to(device=activation.device, dtype=activation.dtype)
    return scale.reshape(scale.shape[0], *([1] * (activation.dim() - 2)), scale.shape[1])


def _register_hooks(model: ClipModel, masks: Mapping[str, torch.Tensor]) -> list:
    handles = []
    try:
        for key, mask in masks.items():
            tower_name, kind = parse_mask_key(key)
            tower = model.towers[tower_name]
            for layer in range(len(tower.blocks())):
                if kind == "head":
                    target = tower.context_module(layer)
                    hook = None if target is None else _head_hook(mask, layer, tower.block_view(layer).head_dim)
                else:
                    target = tower.mlp_out_module(layer)
                    hook = None if target is None else _neuron_hook(mask, layer)
                if target is not None:
                    handles.append(target.register_forward_pre_hook(hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextlib.contextmanager
def _hooks_registered(model: ClipModel, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Mask hooks on the model for the duration of the block (validated masks only)."""
    handles = _register_hooks(model, masks)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def apply_masks(model: ClipModel, masks: Mapping[str, torch.Tensor]) -> Iterator[ClipModel]:
    """Within the block, the model's forward passes are masked; hooks are removed on exit.

    Head masks scale each head's slice of the attention context (input of ``context_module``), neuron
    masks scale the input of ``mlp_out_module``. Masks may require grad: gradients flow to them.
    """
    validate_masks(model, masks, "masks")
    with _hooks_registered(model, masks):
        yield model


def _check_batch_first(model: ClipModel, tower_name: str) -> None:
    tower = model.towers[tower_name]
    attention = getattr(tower, "attention", None)
    for layer in range(len(tower.blocks()) if attention is not None else 0):
        if getattr(attention(layer), "batch_first", True) is False:
            raise MaskError(f"per-sample masks need batch-first activations; {tower_name} block {layer} "
                            f"runs sequence-first")


def validate_sample_masks(model: ClipModel, masks: Mapping[str, torch.Tensor], name: str = "masks") -> int:
    """Check per-sample masks ``[batch, layers, units]`` (each ``mask[b]`` must fit ``model``); returns batch."""
    if not isinstance(masks, Mapping) or not masks:
        raise MaskError(f"{name}: expected a non-empty dict of mask tensors, got {type(masks).__name__}")
    batch = None
    for key, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise MaskError(f"{name}: per-sample mask {key} must be a [batch, layers, units] tensor, got {shape}")
        if batch is None:
            batch = mask.shape[0]
        if mask.shape[0] != batch or batch < 1:
            raise MaskError(f"{name}: per-sample masks disagree on the batch size ({batch} vs {mask.shape[0]} "
                            f"for {key})")
    # every sample's slice must be a valid mask: check shape, padding and finiteness on the batch-wise
    # maximum magnitude, which is non-zero / non-finite wherever any sample's entry is
    summary = {key: (mask.detach().abs().amax(0) if mask.is_floating_point() else mask.detach().any(0))
               for key, mask in masks.items()}
    validate_masks(model, summary, name)
    for key in masks:
        _check_batch_first(model, parse_mask_key(key)[0])
    return batch


@contextlib.contextmanager
def apply_sample_masks(model: ClipModel, masks: Mapping[str, torch.Tensor]) -> Iterator[ClipModel]:
    """Like ``apply_masks`` with one mask per sample: ``masks[key]`` is ``[batch, layers, units]``.

    Sample ``b`` of every forward inside the block is scaled by ``mask[b]``; forwards must use exactly
    ``batch`` samples. With leaves that require grad, one backward of a batch loss gives in ``grad[b]``
    the gradient through sample ``b``'s own activations (per-sample gradients without per-sample backwards).
    """
    validate_sample_masks(model, masks, "masks")
    with _hooks_registered(model, masks):
        yield model


def save_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> None:
    """Write masks to a safetensors file atomically; metadata values are stored JSON-encoded."""
    tensors = {}
    for key, mask in masks.items():
        parse_mask_key(key)
        tensors[key] = mask.detach().to("cpu", torch.float32).contiguous()
    meta = {str(k): json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    save_safetensors(path, tensors, meta)


def load_masks(path: str | os.PathLike, with_metadata: bool = False):
    """Read masks written by ``save_masks``; returns the dict, or ``(masks, metadata)`` if asked."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MaskError(f"{path}: mask file not found")
    # save_masks writes float32 only: an integer or half-precision mask file was not written by it
    masks, raw_meta = read_safetensors(path, error=MaskError, unreadable="not a readable safetensors mask file",
                                       dtypes={"*": torch.float32})
    for key in masks:
        try:
            parse_mask_key(key)
        except MaskError as err:
            raise MaskError(f"{path}: {err}") from err
    if not with_metadata:
        return masks
    metadata = {}
    for key, value in raw_meta.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return masks, metadata
