"""AMP's adaptive search (``search.method: adaptive``): per-block MLP widths chosen by a held-out loss.

Blocks are visited from the last to the first (vision tower first, then text if it has neuron scores).
For each block a binary search over the number ``w`` of kept neurons (the ``w`` best-scored of that block):
``left, right = 0, width``; ``halvings`` times, ``mid = (left + right) // 2`` is tried, and accepted when the
held-out loss with ``mid`` neurons is at most ``loss_inc_thresh`` above the previously accepted loss
(``right = mid``), rejected otherwise (``left = mid``). The smallest accepted width stays; if none is accepted
the block keeps every neuron and the reference loss is unchanged. The first reference is the dense loss,
so the loss may drift by up to ``loss_inc_thresh`` per block. Heads are never pruned (AMP prunes MLP neurons
only; head scores, if any, are ignored) and ``constraint`` is not used: the width follows from the threshold.

The held-out loss is the label-free ``entropy`` loss by default (images only, mean over fixed batches of
``batch_size``, weighted by batch size); ``entropy_image_text`` and ``contrastive`` are options. It is
measured on ``holdout``: pairs disjoint from the calibration images (``clipprune.data.holdout``); the loss
is ``heldout.HeldOutLoss``, the trace plot ``clipprune.report.plots.plot_search_trace``.

Speed: while block ``L`` is searched the blocks before it are dense and fixed, so block ``L``'s input is
computed once per batch (from the first block's input, captured with its call arguments by
``models.blocks``) and a candidate width runs blocks ``L ..`` and the tower's tail (``ClipModel.tower_output``)
only; that replay is checked once per tower against ``encode_*``. Features of the tower not being searched are
cached.
The search is deterministic (no sampling; stable ordering of equal scores by index).

Differences from AMP's reference: scores come from one scoring pass on the dense model (its ``ScoreEstimator``),
not re-estimated after each block is pruned (its layer-wise variant); the held-out split is drawn from the
train split (the validation split is the evaluation set here).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from clipprune.errors import MaskError, ModelLoadError, ParamError
from clipprune.models.base import BlockView, ClipModel
from clipprune.models.blocks import batch_first, capture_block_input, run_blocks
from clipprune.models.masks import apply_masks, full_masks
from clipprune.progress import progress_bar

from .common import check_scores, descending_order
from .heldout import HeldOutLoss, heldout_batches
from .registry import register_search

TOWER_ORDER = ("vision", "text")
DEFAULT_HALVINGS = 6
DEFAULT_INV_TEMPERATURE = 20.0
DEFAULT_LOSS_INC_THRESH = 0.02


class _BlockReplay:
    """One tower's held-out batches as block inputs: block ``L``'s input and the features from it."""

    def __init__(self, model: ClipModel, tower: str, inputs: list):
        self.model, self.tower, self.inputs = model, tower, inputs
        self.blocks = model.towers[tower].blocks()
        self.first = [capture_block_input(model, tower, batch) for batch in inputs]

    def block_inputs(self, layer: int) -> list[torch.Tensor]:
        """Input of block ``layer`` for each batch, under whatever masks are applied."""
        return [run_blocks(call, self.blocks[:layer], hidden) for hidden, call in self.first]

    def features(self, layer: int, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tower's embeddings from block ``layer``'s inputs ``states``: blocks ``layer ..`` and the tail."""
        return [self.model.tower_output(self.tower, batch_first(call, run_blocks(call, self.blocks[layer:], hidden)),
                                        batch)
                for (_, call), hidden, batch in zip(self.first, states, self.inputs)]

    def check(self, expected: list[torch.Tensor]) -> None:
        """ModelLoadError unless the replay from block 0 reproduces ``encode_*`` (``expected``) on batch 0."""
        replayed = self.features(0, self.block_inputs(0)[:1])[0]
        if not torch.allclose(replayed, expected[0], rtol=1e-4, atol=1e-5):
            error = (replayed - expected[0]).abs().max().item()
            raise ModelLoadError(f"{self.model.name}: the {self.tower} tower's blocks and tail (tower_output) do not "
                                 f"reproduce encode_{'image' if self.tower == 'vision' else 'text'} (max abs error "
                                 f"{error:.3g}); the adaptive search cannot replay this model")


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
def _searched_towers(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]]) -> list[str]:
    check_scores(scores, views)
    towers = [t for t in TOWER_ORDER if f"{t}.neuron" in scores]
    towers += sorted(t for t in views if f"{t}.neuron" in scores and t not in TOWER_ORDER)
    if not towers:
        raise MaskError("search 'adaptive' needs neuron scores ('<tower>.neuron'); the scores hold "
                        f"{', '.join(sorted(scores)) or 'nothing'} (AMP prunes MLP neurons only)")
    return towers


def _round(value: float) -> float:
    return float(f"{value:.8g}")


@register_search("adaptive", needs_model=True)
def adaptive_search(scores: Mapping[str, torch.Tensor], views: Mapping[str, Sequence[BlockView]], constraint=None,
                    metric: str = "mac", *, model: ClipModel, holdout, report: dict | None = None,
                    loss_inc_thresh: float = DEFAULT_LOSS_INC_THRESH, halvings: int = DEFAULT_HALVINGS,
                    loss: str = "entropy", inv_temperature: float = DEFAULT_INV_TEMPERATURE,
                    batch_size: int = 32, progress: bool = True) -> dict[str, torch.Tensor]:
    """AMP's block-by-block binary search (module docstring); binary float32 masks, heads all kept.

    ``constraint`` and ``metric`` are not used (the metric matters for the caller's summary). ``report``
    (a dict) receives the per-block trace: candidate widths, their held-out losses, the accepted width.
    """
    towers = _searched_towers(scores, views)
    held_out = HeldOutLoss(model, loss, inv_temperature)
    if "text" in towers and not held_out.uses_text:
        raise ParamError(f"search.options.loss={loss} reads images only, so text-tower widths cannot change it; "
                         f"score the vision tower only or use loss entropy_image_text")
    device = next(model.parameters()).device
    masks = {key: value for key, value in full_masks(model, towers).items() if key.endswith(".neuron")}
    training = model.module.training
    model.eval()
    trace = []
    try:
        with torch.no_grad():
            images, tokens = heldout_batches(model, holdout, batch_size, held_out.uses_text, device)
            inputs = {"vision": images, "text": tokens}
            with apply_masks(model, masks):
                features = {"vision": [model.encode_image(b) for b in images],
                            "text": [model.encode_text(b) for b in tokens] if held_out.uses_text
                            else [None] * len(images)}
            dense_loss = reference = held_out(features["vision"], features["text"])
            total_layers = sum(len(views[t]) for t in towers)
            bar = progress_bar(total=total_layers, desc="search adaptive", unit="block", enabled=progress)
            for tower in towers:
                replay = _BlockReplay(model, tower, inputs[tower])
                replay.check(features[tower])
                table = scores[f"{tower}.neuron"].detach().to("cpu", torch.float64).numpy()
                mask = masks[f"{tower}.neuron"]
                for layer in reversed(range(len(views[tower]))):
                    width = views[tower][layer].ffn_dim
                    entry = {"tower": tower, "layer": layer, "width": width, "loss_before": _round(reference),
                             "candidates": []}
                    accepted, accepted_features = width, None
                    if width > 0:
                        order = torch.from_numpy(descending_order(table[layer, :width]).copy())
                        states = replay.block_inputs(layer)  # the blocks before it are dense
                        left, right, tried = 0, width, set()
                        for _ in range(halvings):
                            mid = (left + right) // 2
                            if mid in tried or mid == right:
                                break  # the interval cannot be split further
                            tried.add(mid)
                            mask[layer, :width] = 0.0
                            mask[layer, order[:mid]] = 1.0
                            with apply_masks(model, masks):
                                candidate = replay.features(layer, states)
                            other = features["text" if tower == "vision" else "vision"]
                            value = (held_out(candidate, other) if tower == "vision"
                                     else held_out(other, candidate))
                            ok = value - reference <= loss_inc_thresh
                            entry["candidates"].append({"width": mid, "loss": _round(value),
                                                        "increase": _round(value - reference), "accepted": ok})
                            if ok:
                                right, accepted, accepted_value, accepted_features = mid, mid, value, candidate
                            else:
                                left = mid
                        mask[layer, :width] = 0.0
                        mask[layer, order[:accepted]] = 1.0
                    if accepted_features is not None:
                        features[tower] = accepted_features
                        reference = accepted_value
                    entry.update(accepted_width=accepted, loss_after=_round(reference))
                    trace.append(entry)
                    bar.set_postfix(tower=tower, layer=layer, kept=f"{accepted}/{width}")
                    bar.update()
            bar.close()
    finally:
        model.module.train(training)

    out = {}
    for key, value in full_masks(model, towers).items():
        out[key] = (masks[key] if key in masks else value).detach().to("cpu", torch.float32).clone()
    if report is not None:
        report.update({
            "method": "adaptive", "loss": loss,
            "inv_temperature": inv_temperature if loss != "contrastive" else None,
            "loss_inc_thresh": loss_inc_thresh, "halvings": halvings, "batch_size": batch_size,
            "holdout_samples": int(sum(b.shape[0] for b in images)), "towers": towers,
            "dense_loss": _round(dense_loss), "final_loss": _round(reference),
            "constraint_used": False, "layers": trace,
        })
    return out
