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
measured on ``holdout``: pairs disjoint from the calibration images (see :func:`holdout_pairs`).

Speed: while block ``L`` is searched the blocks before it are dense and fixed, so their output is computed
once per batch and replayed (the blocks' ``forward`` temporarily returns the recorded output): a candidate
width costs the embedding plus blocks ``L ..`` only. Features of the tower not being searched are cached.
The search is deterministic (no sampling; stable ordering of equal scores by index).

Differences from AMP's reference: scores come from one scoring pass on the dense model (its ``ScoreEstimator``),
not re-estimated after each block is pruned (its layer-wise variant); the held-out split is drawn from the
train split (the validation split is the evaluation set here).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipprune.data.calibration import read_calibration
from clipprune.data.coco import CocoCaptions, collate_image_caption_pairs
from clipprune.errors import DataError, MaskError, ParamError
from clipprune.io import atomic_path
from clipprune.models.base import BlockView, ClipModel
from clipprune.models.masks import apply_masks, full_masks

from .common import check_scores, descending_order
from .registry import register_search

TOWER_ORDER = ("vision", "text")
DEFAULT_HALVINGS = 6
DEFAULT_INV_TEMPERATURE = 20.0
DEFAULT_LOSS_INC_THRESH = 0.02
HOLDOUT_STREAM = 0xADA  # second seed word: the holdout draw is independent of the calibration draw


# ---------------------------------------------------------------------------------------------
# the held-out split
# ---------------------------------------------------------------------------------------------
def holdout_pairs(dataset: CocoCaptions, exclude: Iterable[Mapping], num_samples: int, seed: int) -> list[dict]:
    """``num_samples`` (image, caption) pairs of images that no pair in ``exclude`` uses, one per image.

    Disjoint *images* (not just pairs): the entropy loss reads images only, so a calibration image with
    another caption would not be held out. Deterministic for ``seed``, own numpy Generator.
    """
    used = {int(p["image_id"]) for p in exclude}
    free = sorted(i for i in dataset.image_ids if i not in used and dataset.annotation_ids(i))
    if num_samples > len(free):
        raise ParamError(f"search.holdout_samples must be <= {len(free)} (images of {dataset.annotation_file} "
                         f"not used for calibration), got {num_samples}")
    rng = np.random.default_rng([int(seed), HOLDOUT_STREAM])
    pairs = []
    for position in rng.choice(len(free), size=num_samples, replace=False):
        image_id = free[int(position)]
        annotations = sorted(dataset.annotation_ids(image_id))
        pairs.append({"image_id": int(image_id), "annotation_id": int(annotations[int(rng.integers(len(annotations)))])})
    return pairs


def holdout_loader(images_dir: str | os.PathLike, captions_file: str | os.PathLike,
                   calibration_file: str | os.PathLike, preprocess: Callable, num_samples: int, seed: int,
                   batch_size: int = 32) -> DataLoader:
    """Deterministic loader of (images, captions) over :func:`holdout_pairs` of the calibration split."""
    dataset = CocoCaptions(images_dir, captions_file, transform=preprocess)
    calibration, _ = read_calibration(calibration_file, dataset)
    pairs = holdout_pairs(dataset, calibration, num_samples, seed)
    return DataLoader(dataset.pair_dataset(pairs), batch_size=batch_size, shuffle=False, num_workers=0,
                      collate_fn=collate_image_caption_pairs)


# ---------------------------------------------------------------------------------------------
# held-out data and loss
# ---------------------------------------------------------------------------------------------
def _materialise(model: ClipModel, holdout, batch_size: int, uses_text: bool, device) -> tuple[list, list]:
    """All held-out samples re-cut into batches of ``batch_size`` (a tail under 2 joins the previous batch)."""
    images, captions = [], []
    for index, batch in enumerate(holdout):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], torch.Tensor):
            raise DataError(f"search: held-out batch {index} must be (image tensor, captions)")
        images.append(batch[0])
        if uses_text:
            tokens = batch[1] if isinstance(batch[1], torch.Tensor) else model.tokenizer(list(batch[1]))
            captions.append(tokens)
    if not images:
        raise DataError("search: the held-out data yielded no batches")
    all_images = torch.cat(images)
    all_tokens = torch.cat(captions) if uses_text else None
    total = all_images.shape[0]
    if total < 2:
        raise DataError(f"search: the held-out data holds {total} sample; the loss needs at least 2")
    bounds = list(range(0, total, batch_size)) + [total]
    if bounds[-1] - bounds[-2] < 2:  # a last batch of one sample: merge it into the previous batch
        del bounds[-2]
    image_batches = [all_images[a:b].to(device) for a, b in zip(bounds, bounds[1:])]
    token_batches = ([all_tokens[a:b].to(device) for a, b in zip(bounds, bounds[1:])] if uses_text
                     else [None] * len(image_batches))
    return image_batches, token_batches


def _encode(model: ClipModel, tower: str, inputs: torch.Tensor) -> torch.Tensor:
    return model.encode_image(inputs) if tower == "vision" else model.encode_text(inputs)


class _StopForward(Exception):
    """Raised by a capture hook once the block output it wants is recorded (skips the rest of the forward)."""


def _block_outputs(model: ClipModel, tower: str, block: torch.nn.Module, inputs: list) -> list:
    """The output of ``block`` for every batch of ``inputs`` (the forward stops right after it)."""
    outputs = []

    def record(module, args, output):
        outputs.append(output)
        raise _StopForward()

    handle = block.register_forward_hook(record)
    try:
        for batch in inputs:
            try:
                _encode(model, tower, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(outputs) != len(inputs):
        raise RuntimeError(f"{tower} block output was not reached for every held-out batch")
    return outputs


@contextlib.contextmanager
def _replayed(blocks: Sequence[torch.nn.Module], outputs: list, cursor: list):
    """Blocks ``blocks`` skip their computation and return the recorded output for batch ``cursor[0]``.

    Used for all blocks before the searched one: the last of them returns the searched block's input, the
    others' (ignored) outputs are the same tensor. Only the instance ``forward`` is overridden; hooks and
    the model code are untouched, and the override is removed on exit.
    """
    def replay(*args, **kwargs):
        return outputs[cursor[0]]

    patched = []
    try:
        for block in blocks:
            block.forward = replay
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


class _HeldOutLoss:
    """The held-out loss of feature batches, weighted by batch size."""

    def __init__(self, model: ClipModel, loss: str, inv_temperature: float):
        from clipprune.scoring import get_loss

        self.fn = get_loss(loss)
        self.uses_text = self.fn.uses_text
        if loss == "contrastive":  # the CLIP loss keeps the model's own temperature
            self.scale, self.options = model.logit_scale.detach(), {}
        else:
            self.scale, self.options = None, {"inv_temperature": inv_temperature}

    def __call__(self, image_features: list, text_features: list) -> float:
        total, count = 0.0, 0
        for image, text in zip(image_features, text_features):
            value = self.fn(image, text if self.uses_text else None, self.scale, **self.options)
            total += float(value) * image.shape[0]
            count += image.shape[0]
        return total / count


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
    held_out = _HeldOutLoss(model, loss, inv_temperature)
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
            images, tokens = _materialise(model, holdout, batch_size, held_out.uses_text, device)
            inputs = {"vision": images, "text": tokens}
            with apply_masks(model, masks):
                features = {"vision": [model.encode_image(b) for b in images],
                            "text": [model.encode_text(b) for b in tokens] if held_out.uses_text
                            else [None] * len(images)}
            dense_loss = reference = held_out(features["vision"], features["text"])
            total_layers = sum(len(views[t]) for t in towers)
            bar = tqdm(total=total_layers, desc="search adaptive", unit="block", disable=not progress)
            for tower in towers:
                blocks = model.towers[tower].blocks()
                table = scores[f"{tower}.neuron"].detach().to("cpu", torch.float64).numpy()
                mask = masks[f"{tower}.neuron"]
                for layer in reversed(range(len(views[tower]))):
                    width = views[tower][layer].ffn_dim
                    entry = {"tower": tower, "layer": layer, "width": width, "loss_before": _round(reference),
                             "candidates": []}
                    accepted, accepted_features = width, None
                    if width > 0:
                        order = torch.from_numpy(descending_order(table[layer, :width]).copy())
                        before = _block_outputs(model, tower, blocks[layer - 1], inputs[tower]) if layer else None
                        cursor = [0]
                        left, right, tried = 0, width, set()
                        for _ in range(halvings):
                            mid = (left + right) // 2
                            if mid in tried or mid == right:
                                break  # the interval cannot be split further
                            tried.add(mid)
                            mask[layer, :width] = 0.0
                            mask[layer, order[:mid]] = 1.0
                            candidate = []
                            with apply_masks(model, masks), _replayed(blocks[:layer], before, cursor):
                                for index, batch in enumerate(inputs[tower]):
                                    cursor[0] = index
                                    candidate.append(_encode(model, tower, batch))
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


# ---------------------------------------------------------------------------------------------
# the trace plot
# ---------------------------------------------------------------------------------------------
_PNG_METADATA = {"Software": None}  # no matplotlib version in the file: equal traces give equal bytes


def plot_trace(trace: Mapping, path: str | os.PathLike, dpi: int = 100) -> None:
    """PNG of a search trace: held-out loss of every candidate width per block (left), kept neurons per
    block against the dense width (right). A trace without ``layers`` (non-adaptive searches) gets a note."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layers = list(trace.get("layers") or [])
    if not layers:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"search '{trace.get('method', '?')}': no per-block trace", ha="center", va="center")
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        cmap = plt.get_cmap("viridis")
        for k, entry in enumerate(layers):
            points = sorted([(entry["width"], entry["loss_before"])]
                            + [(c["width"], c["loss"]) for c in entry["candidates"]])
            color = cmap(k / max(len(layers) - 1, 1))
            label = f"{entry['tower']} {entry['layer']}"
            left.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, color=color, label=label)
            left.plot([entry["accepted_width"]], [entry["loss_after"]], "*", ms=11, color=color)
        left.set_xlabel("kept neurons (candidate width)")
        left.set_ylabel(f"held-out {trace.get('loss', 'loss')}")
        left.set_title(f"candidates per block (★ accepted), threshold {trace.get('loss_inc_thresh')}")
        left.legend(fontsize=7, ncol=2)
        names = [f"{e['tower'][0]}{e['layer']}" for e in layers][::-1]
        dense = [e["width"] for e in layers][::-1]
        kept = [e["accepted_width"] for e in layers][::-1]
        positions = np.arange(len(names))
        right.bar(positions, dense, color="0.85", label="dense")
        right.bar(positions, kept, color="tab:blue", label="kept")
        right.set_xticks(positions, names)
        right.set_xlabel("block")
        right.set_ylabel("MLP neurons")
        right.set_title("kept neurons per block")
        right.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=_PNG_METADATA, bbox_inches="tight")
    plt.close(fig)
