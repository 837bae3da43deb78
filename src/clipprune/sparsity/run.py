"""Running a sparsity method on a model, applying its weights, and measuring the sparsity reached."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Mapping

import torch

from clipprune.errors import ClipPruneError, MaskError, ParamError
from clipprune.models.base import ClipModel

from .config import SparsityConfig
from .grads import check_loss_for_towers, count_samples, per_sample_gradients
from .inputs import InputSource
from .layers import parameter_names, prunable_linears
from .masks import check_alignment, holds_nm
from .registry import GradientSource, SparsityResult, get_method

log = logging.getLogger(__name__)


def effective_num_grads(requested: int, loader) -> int:
    """``sparsity.num_grads`` capped by the calibration samples: one gradient per sample, no sample reused."""
    available = count_samples(loader)
    return requested if available is None else min(requested, available)


def recomputation_schedule(target: float, steps: int) -> list[float]:
    """The sparsities of the ``steps`` pruning steps to ``target``: cubic from 0 (Zhu & Gupta 2017, the
    gradual-pruning ramp), ``s_i = target · (1 − (1 − i/steps)³)``, so the early steps prune most and the last
    ones, on the most recomputed Fisher, least; ``s_steps = target`` exactly."""
    return [target * (1 - (1 - i / steps) ** 3) for i in range(1, steps + 1)]


def sparsify(model: ClipModel, config: SparsityConfig, loader=None, *, seed: int = 0,
             progress: bool = True) -> SparsityResult:
    """Run ``config.method`` on the Linear layers of ``config.towers``; the model itself is not modified.

    With ``num_recomputations: k > 1`` each target is reached in ``k`` steps (``recomputation_schedule``) on
    a copy of the model: every step runs the method on the copy as the previous step left it (so gradients,
    Fisher or layer inputs are recomputed on the partly pruned model), and a weight pruned once stays zero
    (checked). Returns new weights per target with canonical zeros (+0.0); ``meta`` gains ``wall_time_s``,
    the layer names, their state-dict keys and ``num_grads_used``.
    """
    method = get_method(config.method)
    layers = prunable_linears(model, config.towers)
    for name, layer in layers.items():  # block4 / N:M groups on a structurally pruned model's widths: before any work
        check_alignment(name, layer.weight, config.mask)
    if method.needs_data:
        if method.source == "gradients":
            check_loss_for_towers(config.loss, config.towers)
        if loader is None:
            raise ParamError(f"sparsity.method={config.method} needs calibration data")
    start = time.perf_counter()
    if config.num_recomputations == 1:
        result = _run_method(model, config, loader, seed, progress)
    else:
        result = _run_in_steps(model, config, loader, seed, progress)
    wall = time.perf_counter() - start
    for target, weights in result.weights.items():
        result.weights[target] = {n: torch.where(w == 0, torch.zeros((), dtype=w.dtype), w).contiguous()
                                  for n, w in weights.items()}
    result.meta = {**result.meta, "wall_time_s": wall, "layers": list(layers),
                   "state_keys": parameter_names(model, layers), "method": config.method,
                   "mask_type": config.mask.name}
    return result


def _run_method(model: ClipModel, config: SparsityConfig, loader, seed: int, progress: bool) -> SparsityResult:
    """One run of the method on ``model`` at all of ``config.targets``."""
    method = get_method(config.method)
    layers = prunable_linears(model, config.towers)
    data = None
    if method.needs_data and method.source == "inputs":
        data = InputSource(model, loader, config.towers, effective_num_grads(config.num_grads, loader), progress)
    elif method.needs_data:
        num_grads = effective_num_grads(config.num_grads, loader)

        def stream(names):
            return per_sample_gradients(model, loader, {n: layers[n] for n in names}, loss=config.loss,
                                        num_grads=num_grads, loss_options=config.options, progress=progress)

        data = GradientSource(stream, num_grads)
    torch.manual_seed(seed)
    return method(layers, config, data, progress)


def _run_in_steps(model: ClipModel, config: SparsityConfig, loader, seed: int, progress: bool) -> SparsityResult:
    """Each target in ``num_recomputations`` steps on its own copy of ``model`` (see :func:`sparsify`)."""
    steps = config.num_recomputations
    out, schedules, eliminated, passes, meta = {}, {}, {}, 0, {}
    for target in config.targets:
        work = model.copy()
        schedules[repr(target)] = schedule = recomputation_schedule(target, steps)
        pruned_before = None
        for step, sparsity in enumerate(schedule, 1):
            result = _run_method(work, replace(config, targets=(sparsity,)), loader, seed, progress)
            weights, meta = result.weights[sparsity], result.meta
            passes += meta.get("calibration_passes", 0)
            pruned_now = {n: w == 0 for n, w in weights.items()}
            if pruned_before is not None:
                for name, before in pruned_before.items():
                    revived = int((before & ~pruned_now[name]).sum())
                    if revived:
                        raise ClipPruneError(f"sparsity: step {step} of {steps} of sparsity.method={config.method} "
                                             f"gave {revived} weights of layer {name} pruned by step {step - 1} a "
                                             f"non-zero value (masks must only grow)")
            apply_weights(work, weights, config.towers)
            pruned_before = pruned_now
            log.info("sparsity: target %s step %d/%d at %.4f done", target, step, steps, sparsity)
        out[target] = weights
        for name, counts in meta.get("eliminated_per_layer", {}).items():
            eliminated.setdefault(name, []).extend(counts)
    meta = {**meta, "calibration_passes": passes, "num_recomputations": steps, "recomputation_schedule": schedules}
    if eliminated:
        meta["eliminated_per_layer"] = eliminated
    return SparsityResult(out, meta)


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
