"""Running a sparsity method on a model, applying its weights, and measuring the sparsity reached."""
from __future__ import annotations

import time
from typing import Mapping

import torch

from clipprune.errors import MaskError, ParamError
from clipprune.models.base import ClipModel

from .config import SparsityConfig
from .grads import check_loss_for_towers, count_samples, per_sample_gradients
from .layers import parameter_names, prunable_linears
from .masks import holds_nm
from .registry import GradientSource, SparsityResult, get_method


def effective_num_grads(requested: int, loader) -> int:
    """``sparsity.num_grads`` capped by the calibration samples: one gradient per sample, no sample reused."""
    available = count_samples(loader)
    return requested if available is None else min(requested, available)


def sparsify(model: ClipModel, config: SparsityConfig, loader=None, *, seed: int = 0,
             progress: bool = True) -> SparsityResult:
    """Run ``config.method`` on the Linear layers of ``config.towers``; the model itself is not modified.

    Returns new weights per target with canonical zeros (+0.0); ``meta`` gains ``wall_time_s``, the layer
    names, their state-dict keys and ``num_grads_used``.
    """
    method = get_method(config.method)
    layers = prunable_linears(model, config.towers)
    grads = None
    if method.needs_data:
        check_loss_for_towers(config.loss, config.towers)
        if loader is None:
            raise ParamError(f"sparsity.method={config.method} needs calibration data")
        num_grads = effective_num_grads(config.num_grads, loader)

        def stream(names):
            return per_sample_gradients(model, loader, {n: layers[n] for n in names}, loss=config.loss,
                                        num_grads=num_grads, loss_options=config.options, progress=progress)

        grads = GradientSource(stream, num_grads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = method(layers, config, grads, progress)
    wall = time.perf_counter() - start
    for target, weights in result.weights.items():
        result.weights[target] = {n: torch.where(w == 0, torch.zeros((), dtype=w.dtype), w).contiguous()
                                  for n, w in weights.items()}
    result.meta = {**result.meta, "wall_time_s": wall, "layers": list(layers),
                   "state_keys": parameter_names(model, layers), "method": config.method,
                   "mask_type": config.mask.name}
    return result


def apply_weights(model: ClipModel, weights: Mapping[str, torch.Tensor], towers) -> ClipModel:
    """Copy ``{layer name: weight}`` into ``model``'s layers in place (shapes must match)."""
    layers = prunable_linears(model, towers)
    for name, weight in weights.items():
        if name not in layers:
            raise MaskError(f"sparse weights name layer {name!r}, which the model does not have")
        target = layers[name].weight
        if tuple(weight.shape) != tuple(target.shape):
            raise MaskError(f"sparse weight {name} has shape {tuple(weight.shape)}, the model's is "
                            f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(weight.to(target.dtype))
    return model


def sparsity_stats(weights: Mapping[str, torch.Tensor], nm: tuple[int, int] | None = None) -> dict:
    """Zero fraction per layer and overall (over the pruned layers); with ``nm`` also whether each holds it."""
    per_layer, zeros, total = {}, 0, 0
    for name, w in weights.items():
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    stats = {"overall": zeros / max(total, 1), "per_layer": per_layer, "pruned_weights": zeros,
             "prunable_weights": total}
    if nm is not None:
        stats["nm_pattern_holds"] = all(holds_nm(w, *nm) for w in weights.values())
    return stats
