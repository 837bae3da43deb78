"""Kwon et al.'s Fisher criterion: importance = Σ (∂loss/∂mask)² over calibration batches or samples.

Masks are all-ones leaves that require grad; the model's parameters are frozen (restored afterwards), so a
backward builds only the graph that leads to the masks and no parameter ``.grad`` is ever touched.

* ``granularity="batch"``: one gradient row per mini-batch (Kwon's reference squares per batch of 32).
* ``granularity="sample"``: one row per sample from a single backward per batch: every sample gets its
  own copy of the masks (``[batch, layers, units]``, ``models.masks.apply_sample_masks``), so the gradient
  of the summed batch loss (batch size × mean loss) w.r.t. copy ``b`` is sample ``b``'s gradient through
  its own activations. Rows of a batch sum to batch size × that batch's gradient.

No mask is ever given a made-up zero gradient (a zero score is pruned first): a mask that receives no
gradient in a batch, or a layer of a mask whose gradient is identically zero over the whole calibration
set (its hook point was bypassed or does not reach the loss), stops scoring with an error naming the mask
key, the layer or the batch. Units that cannot reach the loss by construction (the text tower under an
images-only loss) are refused up front (``check_towers_for_loss``). The one legitimate case is a mask with
no units at all (every sub-block of that kind already pruned away, shape ``[layers, 0]``): nothing to
score, its empty gradient stays empty.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from clipprune.distributed import current, shard_batches
from clipprune.errors import ClipPruneError, DataError, ParamError
from clipprune.models.base import ClipModel
from clipprune.models.masks import apply_masks, apply_sample_masks, block_widths, full_masks, parse_mask_key
from clipprune.progress import progress_bar

from .losses import check_loss_options, get_loss
from .registry import GRADS_SUFFIX, ScoreResult, register_criterion


@contextlib.contextmanager
def frozen_parameters(model: ClipModel) -> Iterator[ClipModel]:
    """Eval mode and ``requires_grad=False`` on every parameter inside the block; both restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.module.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.module.train(training)


def _tokens(model: ClipModel, captions) -> torch.Tensor:
    if isinstance(captions, torch.Tensor):
        return captions
    return model.tokenizer(list(captions))


def check_towers_for_loss(loss: str, towers: tuple[str, ...]) -> None:
    """Text-tower masks only get a gradient from a loss that encodes the captions."""
    if "text" in towers and not get_loss(loss).uses_text:
        raise ParamError(f"score.towers={'both' if len(towers) > 1 else 'text'} needs a loss that uses the "
                         f"captions, but score.loss={loss} uses images only (its text-tower gradients would be "
                         f"zero); use score.towers: vision or score.loss: contrastive")


def mask_gradients(model: ClipModel, images: torch.Tensor, tokens: torch.Tensor | None, loss: str,
                   towers: tuple[str, ...], per_sample: bool, loss_options: dict | None = None,
                   batch_index: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss value, {mask key: gradient}) of one batch with all-ones masks on ``towers``.

    The gradient is ``[layers, units]`` of the batch's mean loss, or with ``per_sample`` ``[batch, layers,
    units]`` of the summed loss, row ``b`` through sample ``b``'s own activations. Parameters must already
    be frozen (``frozen_parameters``) for the backward to reach only the masks. A mask with units that gets
    no gradient at all is a ClipPruneError naming it and ``batch_index``.
    """
    loss_fn = get_loss(loss)
    batch = images.shape[0]
    base = full_masks(model, towers, requires_grad=not per_sample)
    if per_sample:
        masks = {k: v.unsqueeze(0).repeat(batch, 1, 1).requires_grad_(True) for k, v in base.items()}
        masked = apply_sample_masks(model, masks)
    else:
        masks = base
        masked = apply_masks(model, masks)
    keys = list(masks)
    # the backward too runs with the masks' hooks in place: score.checkpointing recomputes blocks in it
    with masked:
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokens) if loss_fn.uses_text else None
        value = loss_fn(image_features, text_features, model.logit_scale.detach(), **(loss_options or {}))
        objective = value * batch if per_sample else value
        grads = torch.autograd.grad(objective, [masks[k] for k in keys], allow_unused=True)
    out = {}
    for key, grad in zip(keys, grads):
        if grad is None and masks[key].numel() > 0:
            raise ClipPruneError(f"score: mask {key} received no gradient in calibration batch {batch_index} "
                                 f"(none of its hook points ran, or they do not reach score.loss={loss})")
        # a mask without units (every such sub-block pruned away) has nothing to score
        out[key] = torch.zeros_like(masks[key]) if grad is None else grad
    return value.detach(), out


def _reached_layers(grad: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """``[layers]`` bool: layers with any non-zero gradient entry in this batch."""
    nonzero = grad.detach() != 0
    if per_sample:
        nonzero = nonzero.any(0)
    return nonzero.any(-1).cpu()


def check_every_layer_reached(model: ClipModel, reached: dict[str, torch.Tensor], batches: int, loss: str) -> None:
    """ClipPruneError for a layer with units whose mask gradient was zero in every calibration batch.

    Single units may legitimately score 0 (a dead head or neuron: pruning it costs nothing), but a whole
    layer with no gradient means its hook point was bypassed or is cut off from the loss: its units would
    all score 0 and be pruned first.
    """
    for key, layers in reached.items():
        tower, kind = parse_mask_key(key)
        for layer, width in enumerate(block_widths(model, tower, kind)):
            if width > 0 and not bool(layers[layer]):
                raise ClipPruneError(f"score: mask {key} layer {layer} received an identically zero gradient in "
                                     f"all {batches} calibration batches (its hook point does not reach "
                                     f"score.loss={loss}); its {kind}s would all score 0 and be pruned first")


def gradient_batches(model: ClipModel, loader, loss: str, towers, per_sample: bool, loss_options: dict | None,
                     desc: str, progress: bool):
    """Yield ``(batch size, loss value, mask gradients)`` for each calibration batch, parameters frozen.

    The shared loop of the gradient criteria: checks that the batch holds image tensors, moves it to the
    model's device, tokenizes captions only when the loss reads text, and stops with a one-line error on a
    non-finite loss or gradient, and after the last batch on a layer that no gradient reached
    (``check_every_layer_reached``).

    Data parallel (``clipprune.distributed.data_parallel`` active with several processes): batch ``i`` is
    computed by rank ``i mod N``, then every rank receives every batch's loss and gradients (CPU float32) and
    this yields them in batch order, so whatever a criterion sums over batches is summed in the same order
    as in one process.
    """
    uses_text = get_loss(loss).uses_text
    device = next(model.parameters()).device
    ctx = current()

    def one_batch(index: int, images, captions):
        if not isinstance(images, torch.Tensor):
            raise DataError(f"score: batch {index} holds {type(images).__name__} images, expected a tensor "
                            f"(build the dataset with the model's preprocess transform)")
        images = images.to(device)
        # captions are not even tokenized for an image-only loss: they cannot influence the gradients
        tokens = _tokens(model, captions).to(device) if uses_text else None
        value, grads = mask_gradients(model, images, tokens, loss, towers, per_sample, loss_options,
                                      batch_index=index)
        if not torch.isfinite(value) or not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            raise ClipPruneError(f"score: non-finite gradient in batch {index} (loss={value.item():.6g}); "
                                 f"check the model weights, score.loss and score.options")
        return images.shape[0], value, grads

    def computed():
        with frozen_parameters(model):
            if ctx.world == 1:
                for index, (images, captions) in enumerate(progress_bar(loader, desc=desc, unit="batch",
                                                                        enabled=progress)):
                    yield one_batch(index, images, captions)
                return
            local = [one_batch(index, images, captions) for index, (images, captions) in
                     progress_bar(shard_batches(loader, ctx), desc=f"{desc} rank {ctx.rank}", unit="batch",
                                  enabled=progress)]
        keys = list(local[0][2]) if local else None
        keys = ctx.gather_json([keys])  # a rank without batches learns the keys from one that has some
        keys = next((k for k in keys if k is not None), [])
        sizes = ctx.gather_batches([torch.tensor([size]) for size, _, _ in local])
        values = ctx.gather_batches([value.detach().to("cpu", torch.float32).reshape(1) for _, value, _ in local])
        grads = {key: ctx.gather_batches([g[key].detach().to("cpu", torch.float32) for _, _, g in local])
                 for key in keys}
        for index, (size, value) in enumerate(zip(sizes, values)):
            yield int(size[0]), value[0], {key: grads[key][index] for key in keys}

    reached: dict[str, torch.Tensor] = {}
    batches = 0
    for size, value, grads in computed():
        for key, grad in grads.items():
            now = _reached_layers(grad, per_sample)
            reached[key] = now if key not in reached else reached[key] | now
        batches += 1
        yield size, value, grads
    if batches:
        check_every_layer_reached(model, reached, batches, loss)


@register_criterion("fisher")
def fisher_scores(model: ClipModel, loader, *, towers, loss, granularity, progress, keep_grads: bool = True,
           **loss_options) -> ScoreResult:
    """Empirical Fisher of the head / neuron masks: Σ_rows (∂loss/∂mask)², rows = batches or samples.

    ``loss_options`` go to the loss (e.g. ``inv_temperature`` for ``entropy``); ``keep_grads=False`` skips
    returning the gradient rows (they need rows × units × 4 bytes).
    """
    if loss is None:
        raise ParamError("score.loss is required by criterion 'fisher'")
    check_loss_options(loss, loss_options)
    check_towers_for_loss(loss, towers)
    if loader is None:
        raise ParamError("score.criterion=fisher needs calibration data (a loader of image-caption batches)")
    per_sample = granularity == "sample"
    fisher_sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    losses: list[float] = []
    samples = 0
    for batch, value, grads in gradient_batches(model, loader, loss, towers, per_sample, loss_options,
                                                f"score fisher ({loss}, {granularity})", progress):
        for key, grad in grads.items():
            batch_rows = grad.detach().to("cpu", torch.float32)
            batch_rows = batch_rows if per_sample else batch_rows.unsqueeze(0)
            # float64 accumulation: the sum over thousands of rows stays exact to float32 precision
            squared = batch_rows.double().pow(2).sum(0)
            fisher_sums[key] = squared if key not in fisher_sums else fisher_sums[key] + squared
            if keep_grads:
                rows.setdefault(key, []).append(batch_rows)
        losses.append(value.item())
        samples += batch
    if not losses:
        raise DataError("score: the calibration data yielded no batches")
    return ScoreResult(
        scores={key: value.float() for key, value in fisher_sums.items()},
        grads={key + GRADS_SUFFIX: torch.cat(parts) for key, parts in rows.items()},
        meta={"loss": loss, "loss_options": dict(loss_options), "num_samples": samples,
              "num_batches": len(losses), "mean_loss": sum(losses) / len(losses),
              "grad_rows": "sample" if per_sample else "batch"},
    )
