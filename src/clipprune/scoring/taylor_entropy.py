"""AMP's label-free first-order Taylor importance of MLP neurons (criterion ``taylor_entropy``).

For MLP neuron ``j`` of a block, with ``a_j`` its activation (the input of the block's second MLP linear) and
``L`` a label-free batch loss, AMP scores ``I_j = E |Σ_tokens a_j · ∂L/∂a_j|``. The activation is reached by
the neuron-mask hook (``models.masks``): a mask ``m`` scales ``a``, and at ``m = 1``
``∂L/∂m_j = Σ_tokens a_j · ∂L/∂a_j``, so the score is the absolute mask gradient:

* ``granularity="sample"`` (AMP's definition): every sample gets its own copy of the mask, the absolute
  value is taken per sample (``|Σ_tokens a_j ∂L/∂a_j|`` over that sample's tokens, ``L`` the mean loss of its
  batch), then averaged over all samples;
* ``granularity="batch"``: the absolute value of the whole batch's sum, averaged over batches.

Losses (``score.loss``), both label-free and both the mean over the batch:

* ``entropy`` (default for AMP, images only): entropy of softmax(τ⁻¹ · cos(z_i, z_k)), k ≠ i, over the
  normalised image embeddings of the batch. No caption is read, so captions cannot change the scores.
  (AMP's reference keeps the k = i term; this project's ``entropy`` loss leaves it out, so the
  distribution describes the neighbours rather than being dominated by the self-similarity.)
* ``entropy_image_text`` (``losses``): the image→text and text→image entropies of
  softmax(τ⁻¹ · cos(image, caption)) over the batch, averaged. It uses the captions but not which caption
  belongs to which image (permuting the captions of a batch leaves it unchanged).

τ⁻¹ is the option ``inv_temperature`` (AMP: 15–20; default 20 here).

AMP scores MLP neurons only. Heads get no score: the result holds ``"<tower>.head"`` as an *empty*
``[layers, 0]`` tensor and lists those keys in ``meta["unscored"]``; :func:`scored_only` drops them (the
score stage does, so ``scores.safetensors`` holds neuron scores only and every search keeps all heads). An
empty tensor, unlike zeros, cannot be mistaken for "every head is unimportant": handing it to a search
fails on its shape.

Gradient rows of the neuron masks (``"<tower>.neuron.grads"``, signed, the same convention as ``fisher``:
one row per batch of the batch-mean loss, or per sample of the summed loss) are kept unless
``keep_grads=False``; the tune stage's rearrangement uses them.
"""
from __future__ import annotations

from typing import Mapping

import torch

from clipprune.errors import DataError, ParamError

from .fisher import check_towers_for_loss, gradient_batches
from .registry import GRADS_SUFFIX, ScoreResult, register_criterion

LABEL_FREE_LOSSES = ("entropy", "entropy_image_text")
DEFAULT_INV_TEMPERATURE = 20.0


def scored_only(scores: Mapping[str, torch.Tensor], meta: Mapping | None = None) -> dict[str, torch.Tensor]:
    """``scores`` without the keys the criterion did not score (``meta["unscored"]``, or empty tensors)."""
    unscored = set((meta or {}).get("unscored", ()))
    return {k: v for k, v in scores.items() if k not in unscored and v.numel() > 0}


@register_criterion("taylor_entropy")
def taylor_entropy_scores(model, loader, *, towers, loss, granularity, progress,
                          inv_temperature: float = DEFAULT_INV_TEMPERATURE, keep_grads: bool = True) -> ScoreResult:
    """AMP's neuron importance (module docstring): mean |Σ_tokens a·∂L/∂a| per neuron, heads unscored.

    ``loss`` must be ``entropy`` (image–image) or ``entropy_image_text``; ``inv_temperature`` is τ⁻¹.
    """
    if loss not in LABEL_FREE_LOSSES:
        raise ParamError(f"score.criterion=taylor_entropy needs a label-free score.loss "
                         f"({' or '.join(LABEL_FREE_LOSSES)}); got {loss!r}")
    inv_temperature = float(inv_temperature)
    check_towers_for_loss(loss, towers)
    if loader is None:
        raise ParamError("score.criterion=taylor_entropy needs calibration data (a loader of image batches)")
    per_sample = granularity == "sample"
    neuron_keys = [f"{t}.neuron" for t in towers]

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {key: [] for key in neuron_keys}
    losses: list[float] = []
    samples = 0
    for batch, value, grads in gradient_batches(model, loader, loss, towers, per_sample,
                                                {"inv_temperature": inv_temperature},
                                                f"score taylor_entropy ({loss}, {granularity})", progress):
        for key in neuron_keys:
            grad = grads[key].detach().to("cpu", torch.float32)
            # per sample, mask_gradients differentiates batch × mean loss: divide to get AMP's ∂(mean)/∂a
            taylor = (grad / batch).abs().sum(0) if per_sample else grad.abs()
            taylor = taylor.double()  # float64 accumulation over many batches
            sums[key] = taylor if key not in sums else sums[key] + taylor
            if keep_grads:
                rows[key].append(grad if per_sample else grad.unsqueeze(0))
        losses.append(value.item())
        samples += batch
    if not losses:
        raise DataError("score: the calibration data yielded no batches")
    count = samples if per_sample else len(losses)
    scores = {key: (value / count).float() for key, value in sums.items()}
    for tower in towers:  # heads are not scored (AMP prunes MLP neurons only): empty, see scored_only
        scores[f"{tower}.head"] = torch.zeros(len(model.towers[tower].blocks()), 0)
    return ScoreResult(
        scores=scores,
        grads={key + GRADS_SUFFIX: torch.cat(parts) for key, parts in rows.items() if parts},
        meta={"loss": loss, "loss_options": {"inv_temperature": inv_temperature}, "num_samples": samples,
              "num_batches": len(losses), "mean_loss": sum(losses) / len(losses),
              "grad_rows": "sample" if per_sample else "batch", "unscored": [f"{t}.head" for t in towers]},
    )
