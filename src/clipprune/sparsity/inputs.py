"""Layer-input statistics for the input-based methods (Wanda, SparseGPT), block by block on a pruned copy.

Both papers prune a transformer sequentially: the inputs of block ``b``'s layers are computed by the model
whose blocks before ``b`` are already pruned, so each block compensates for the error the earlier ones
made. ``prune_sequentially`` does this on a copy of the model: one calibration forward pass per block
(forward hooks on the block's Linear layers accumulate the statistic in float64 over every token of the
first ``num_samples`` calibration samples), then the block's new weights go into the copy before the next
block's pass. Within a block, every layer's inputs come from the same pass (as in both references).

Data parallel (``clipprune.distributed.data_parallel`` with several processes): each calibration pass is shared
by batches (``shard_rounds``: batch ``i`` on rank ``i mod N``), the per-batch sums are gathered and added in batch
order on every rank, so every rank prunes with the same statistics as one process would.

Statistics: ``"gram"`` — ``Σ x xᵀ`` over tokens (``[in, in]``, SparseGPT's Hessian up to the factor 2);
``"sq_norm"`` — ``Σ x_j²`` per input feature (``[in]``, the squared ``‖X_j‖₂`` of Wanda).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from clipprune.distributed import current, shard_rounds
from clipprune.errors import ClipPruneError, DataError
from clipprune.models.base import ClipModel
from clipprune.progress import progress_bar

from .layers import prunable_linears

log = logging.getLogger(__name__)

STATISTICS = ("gram", "sq_norm")


@dataclass
class InputSource:
    """The model and calibration data the input-based methods read; ``passes`` counts the forward passes."""

    model: ClipModel
    loader: object
    towers: tuple[str, ...]
    num_samples: int
    progress: bool = True
    passes: int = 0

    def statistics(self, model: ClipModel, layers: Mapping[str, nn.Linear], kind: str) -> dict[str, torch.Tensor]:
        """One calibration forward pass of ``model``: ``{name: statistic}`` (float64) summed over every token of
        the first ``num_samples`` samples; a layer whose forward never ran is an error."""
        if kind not in STATISTICS:
            raise ValueError(f"unknown input statistic {kind!r}")
        self.passes += 1
        sums: dict[str, torch.Tensor] = {}
        towers = {name.partition(".")[0] for name in layers}
        device = next(model.parameters()).device
        ctx = current()
        seen = 0
        with torch.no_grad():
            # data parallel: each rank runs one batch of the round; the per-batch sums are gathered and added
            # in batch order, so the statistic is the same floats as in one process
            for sizes, mine in shard_rounds(self.loader, ctx):
                if seen >= self.num_samples:
                    break
                keeps = []
                for size in sizes:
                    keeps.append(max(0, min(size, self.num_samples - seen - sum(keeps))))
                parts: dict[str, torch.Tensor] = {}
                if mine is not None and keeps[ctx.rank] > 0:
                    self._one_batch(model, layers, mine, keeps[ctx.rank], towers, device, kind, parts)
                for name in layers:
                    for part in ctx.gather_batches([parts[name]] if name in parts else []):
                        sums[name] = part if name not in sums else sums[name] + part
                seen += sum(keeps)
        if seen == 0:
            raise DataError("sparsity: the calibration data yielded no batches")
        return sums

    def _one_batch(self, model: ClipModel, layers, mine, keep: int, towers, device, kind: str, parts: dict) -> None:
        """The statistic of the first ``keep`` samples of batch ``mine = (index, (images, captions))`` into
        ``parts``; a layer whose forward never ran is an error."""
        index, (images, captions) = mine
        ran: set = set()
        with _accumulate(layers, parts, ran, kind):
            if "vision" in towers:
                model.encode_image(images[:keep].to(device))
            if "text" in towers:
                tokens = captions if isinstance(captions, torch.Tensor) else model.tokenizer(list(captions))
                model.encode_text(tokens[:keep].to(device))
        for name in layers:
            if name not in ran:
                raise ClipPruneError(f"sparsity: layer {name} was never called in calibration batch {index} (the "
                                     f"model bypasses this module's forward), so its inputs cannot be collected")


@contextlib.contextmanager
def _accumulate(layers: Mapping[str, nn.Linear], sums: dict, ran: set, kind: str):
    def make_hook(name):
        def hook(module, args, output):
            ran.add(name)
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float64)  # every token a row
            part = x.T @ x if kind == "gram" else x.pow(2).sum(0)
            sums[name] = part if name not in sums else sums[name] + part

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_groups(names) -> list[list[str]]:
    """Consecutive layer names of one transformer block (``<tower>.<block>.<proj>``) grouped, in order."""
    groups: list[list[str]] = []
    for name in names:
        block = name.rsplit(".", 1)[0]
        if groups and groups[-1][0].rsplit(".", 1)[0] == block:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def prune_sequentially(names, source: InputSource, kind: str,
                       prune_layer: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
                       desc: str) -> dict[str, torch.Tensor]:
    """New weights of ``names``: block by block, ``prune_layer(name, dense weight, statistic)`` on the inputs
    that a copy of the model, its earlier blocks already pruned, gives the block. ``source.model`` is not
    modified."""
    work = source.model.copy()
    work_layers = prunable_linears(work, source.towers)
    out: dict[str, torch.Tensor] = {}
    for group in progress_bar(block_groups(names), desc=desc, unit="block", enabled=source.progress):
        stats = source.statistics(work, {n: work_layers[n] for n in group}, kind)
        for name in group:
            weight = work_layers[name].weight
            out[name] = prune_layer(name, weight.detach().to("cpu", torch.float64), stats[name])
            with torch.no_grad():
                weight.copy_(out[name].to(weight.dtype))
    return out


def prune_at_targets(names, config, source: InputSource, kind: str,
                     prune_layer_at: Callable[[float | None], Callable], label: str) -> dict[float, dict]:
    """``{target: new weights}``: one sequential pass per target with ``prune_layer_at(target)``; an N:M mask
    fixes the sparsity, so one pass (``prune_layer_at(None)``) serves every target."""
    mask = config.mask
    if mask.kind == "nm":
        weights = prune_sequentially(names, source, kind, prune_layer_at(None), desc=f"{label} {mask.name}")
        return {target: weights for target in config.targets}
    return {target: prune_sequentially(names, source, kind, prune_layer_at(target), desc=f"{label} {target}")
            for target in config.targets}
