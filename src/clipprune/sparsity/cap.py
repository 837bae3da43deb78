"""CAP: OBS in blocks of the empirical Fisher, global allocation by cumulative OBS loss.

Two sweeps over the layers, one chunk of layers' Fisher factors worked on at a time:

1. build each layer's block Fisher (Cholesky factors, ``fisher.py``) from the per-sample gradients and run
   OBS to the end in every block on its float64 inverse, recording the cumulative loss after each
   elimination;
2. one global threshold over all layers' cumulative losses meets each target exactly (a block's losses
   are non-decreasing, so each block eliminates a prefix of its order); a second OBS run on the same
   factors stops every block at its count for each target and returns those weights.

How many layers one calibration pass builds (``chunk_layers``) comes from the memory plan
(``memory.py``, made before any factor is allocated). With one chunk the factors stay in memory for
sweep 2; otherwise they are written to a temporary directory (``offload: true``) or rebuilt by a second
calibration pass per chunk. Results do not depend on the chunking. For N:M the allocation is fixed per
group; one sweep suffices.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from clipprune.errors import ClipPruneError
from clipprune.progress import progress_bar

from .config import MaskType, SparsityConfig
from .fisher import BlockFisher, block_inverse, from_blocks, to_blocks, valid_positions
from .masks import check_alignment, smallest_k
from .memory import SWEEP_CHUNK, available_memory, plan_fisher_memory
from .obs import ObsTrace, obs_sweep
from .registry import GradientSource, SparsityResult, register_method

log = logging.getLogger(__name__)


def effective_block_size(block_size: int, mask: MaskType) -> int:
    """The Fisher block size actually used: a multiple of the mask's group (4 for block4, M for N:M), so that
    no group straddles two blocks; ``fisher_block_size`` rounded down to one (at least one group)."""
    align = mask.alignment
    return max(align, block_size // align * align)


def build_factors(layers, names: list[str], grads: GradientSource, block_size: int, damp: float,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Block Fisher factors of the named layers from one calibration pass."""
    fishers = {n: BlockFisher(layers[n].weight.numel(), block_size, damp, grads.num_grads, dtype) for n in names}
    for batch in grads.stream(names):
        for name in names:
            fishers[name].update(batch[name])
    for name, fisher in fishers.items():
        if fisher.seen != grads.num_grads:
            raise ClipPruneError(f"sparsity: expected {grads.num_grads} gradients for {name}, got {fisher.seen}")
    return {n: f.factor for n, f in fishers.items()}


class _FactorStore:
    """Where sweep 1 leaves a layer's factors for sweep 2: memory, a temporary directory, or nowhere."""

    def __init__(self, mode: str):
        self.mode = mode  # "memory" | "disk" | "rebuild"
        self.memory: dict[str, torch.Tensor] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="clipprune-cap-")) if mode == "disk" else None

    def put(self, name: str, factor: torch.Tensor) -> None:
        if self.mode == "memory":
            self.memory[name] = factor
        elif self.mode == "disk":
            np.save(self.dir / f"{name}.npy", factor.numpy(), allow_pickle=False)

    def get(self, name: str) -> torch.Tensor | None:
        if self.mode == "memory":
            return self.memory.pop(name)
        if self.mode == "disk":
            path = self.dir / f"{name}.npy"
            factor = torch.from_numpy(np.load(path, allow_pickle=False))
            path.unlink()
            return factor
        return None

    def close(self) -> None:
        self.memory.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def chunked_sweep(weights, factor, valid, mask, snapshot_counts=None) -> ObsTrace:
    """:func:`obs_sweep` over ``SWEEP_CHUNK`` blocks at a time, each on its float64 inverse ``F⁻¹`` computed
    from the stored factors (same result as one sweep, faster on a CPU; ``factor`` is not modified)."""
    parts = []
    for s in range(0, weights.shape[0], SWEEP_CHUNK):
        e = s + SWEEP_CHUNK
        parts.append(obs_sweep(weights[s:e], block_inverse(factor[s:e]), valid[s:e], mask,
                               None if snapshot_counts is None else snapshot_counts[:, s:e]))
    return ObsTrace(cum_loss=torch.cat([p.cum_loss for p in parts]), order=torch.cat([p.order for p in parts]),
                    weights=torch.cat([p.weights for p in parts]),
                    snapshots=None if snapshot_counts is None else torch.cat([p.snapshots for p in parts], 1))


def _weight_blocks(layer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = layer.weight.detach().to("cpu", torch.float64).reshape(-1)
    return to_blocks(w, block_size), valid_positions(w.numel(), block_size)


@register_method("cap")
def cap_sparsify(layers, config: SparsityConfig, grads: GradientSource, progress: bool = True) -> SparsityResult:
    """CAP one-shot pruning of ``layers`` at every target of ``config`` (see module docstring)."""
    mask = config.mask
    for name, layer in layers.items():
        check_alignment(name, layer.weight, mask)
    block_size = effective_block_size(config.fisher_block_size, mask)
    dtype = getattr(torch, config.fisher_dtype)
    names = list(layers)
    plan = plan_fisher_memory(names, [layers[n].weight.numel() for n in names], block_size, dtype.itemsize,
                              config.batch_size, config.chunk_layers, config.offload, available_memory())
    log.info("cap: %s", plan.describe())
    chunks = [names[i:i + plan.chunk_layers] for i in range(0, len(names), plan.chunk_layers)]
    mode = plan.mode
    store = _FactorStore(mode)
    targets = list(config.targets)
    out: dict[float, dict[str, torch.Tensor]] = {t: {} for t in targets}
    cum_losses: dict[str, torch.Tensor] = {}
    try:
        for part in chunks:  # sweep 1: traces
            factors = build_factors(layers, part, grads, block_size, config.damp, dtype)
            for name in progress_bar(part, desc="cap obs traces", unit="layer", enabled=progress):
                weights, valid = _weight_blocks(layers[name], block_size)
                factor = factors.pop(name)
                trace = chunked_sweep(weights, factor, valid, mask)
                if mask.kind == "nm":
                    pruned = _to_weight(trace.weights, layers[name])
                    for t in targets:
                        out[t][name] = pruned
                    continue
                cum_losses[name] = trace.cum_loss
                store.put(name, factor)
                del factor
        if mask.kind == "nm":
            return SparsityResult(out, _meta(config, block_size, grads, plan, None))
        units = sum(int(torch.isfinite(c).sum()) for c in cum_losses.values())
        counts = {name: torch.zeros(len(targets), c.shape[0], dtype=torch.long) for name, c in cum_losses.items()}
        for ti, target in enumerate(targets):
            chosen = smallest_k(list(cum_losses.values()), round(target * units))
            for name, c in zip(cum_losses, chosen):
                counts[name][ti] = c.sum(1)
        for part in chunks:  # sweep 2: weights at each target's per-block counts
            rebuilt = build_factors(layers, part, grads, block_size, config.damp, dtype) if mode == "rebuild" else {}
            for name in progress_bar(part, desc="cap obs weights", unit="layer", enabled=progress):
                factor = rebuilt.pop(name) if mode == "rebuild" else store.get(name)
                weights, valid = _weight_blocks(layers[name], block_size)
                trace = chunked_sweep(weights, factor, valid, mask, snapshot_counts=counts[name])
                for ti, t in enumerate(targets):
                    out[t][name] = _to_weight(trace.snapshots[ti], layers[name])
                del factor
    finally:
        store.close()
    per_layer = {name: [int(c) for c in counts[name].sum(1) * mask.group] for name in counts}
    return SparsityResult(out, _meta(config, block_size, grads, plan, per_layer))


def _to_weight(blocks: torch.Tensor, layer) -> torch.Tensor:
    shape = layer.weight.shape
    return from_blocks(blocks, layer.weight.numel()).to(torch.float32).reshape(shape).contiguous()


def _meta(config: SparsityConfig, block_size: int, grads: GradientSource, plan, per_layer) -> dict:
    meta = {"allocation": "per group (N:M)" if config.mask.kind == "nm" else "global (cumulative OBS loss)",
            "fisher_block_size_used": block_size, "num_grads_used": grads.num_grads,
            "calibration_passes": grads.passes, "inverse_store": plan.mode, "chunk_layers_used": plan.chunk_layers,
            "fisher_factor_bytes": plan.factor_bytes, "estimated_peak_bytes": plan.peak_bytes}
    if per_layer is not None:
        meta["eliminated_per_layer"] = per_layer
    return meta
