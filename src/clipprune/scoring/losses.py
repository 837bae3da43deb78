"""Batch losses for gradient-based scoring (registry looked up by ``score.loss``).

A loss is ``fn(image_features, text_features, scale, **options) -> scalar`` over the features of one batch
(``[batch, dim]`` each, not normalised: every loss L2-normalises inside) and the model's logit scale. It is
a *mean* over the batch; the per-sample criterion multiplies it by the batch size to get the summed loss.
Losses that ignore the captions are registered with ``uses_text=False`` and get ``text_features=None``.

Built in: ``contrastive`` (Kwon), ``entropy`` and ``entropy_image_text`` (AMP, label-free), ``max_logit``
(LFPR, label-free).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from clipprune.errors import ParamError
from clipprune.registry import Registry

LossFn = Callable[..., torch.Tensor]

LOSSES = Registry("score.loss", "loss", fixed=("image_features", "text_features", "scale"))


def _checked(fn: LossFn, name: str, known: tuple[str, ...], takes_any: bool) -> LossFn:
    """The registered loss: unknown options are a one-line ParamError."""

    @functools.wraps(fn)
    def loss(image_features, text_features, scale, **options):
        LOSSES.check_options(name, options, known, takes_any)
        return fn(image_features, text_features, scale, **options)

    return loss


def register_loss(name: str, uses_text: bool = True, min_batch: int = 1) -> Callable[[LossFn], LossFn]:
    """Decorator: register a batch loss under ``name``; unknown options raise a one-line ParamError.

    ``min_batch``: the fewest samples a batch must hold for the loss to be defined.
    """
    return LOSSES.register(name, _checked, uses_text=uses_text, min_batch=min_batch)


def available_losses() -> list[str]:
    return LOSSES.names()


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; ParamError naming ``score.loss`` otherwise."""
    return LOSSES.get(name)


def check_loss_options(name: str, options: dict) -> None:
    """ParamError for options the loss does not take (before any data is touched)."""
    LOSSES.check_options(name, options)


@register_loss("contrastive")
def contrastive(image_features: torch.Tensor, text_features: torch.Tensor, scale) -> torch.Tensor:
    """Symmetric InfoNCE (the CLIP loss): image i's positive is caption i, averaged over both directions."""
    if text_features is None or text_features.shape[0] != image_features.shape[0]:
        raise ValueError("contrastive loss needs one caption feature per image")
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = scale * image @ text.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@register_loss("entropy", uses_text=False, min_batch=2)
def entropy(image_features: torch.Tensor, text_features, scale, inv_temperature=None) -> torch.Tensor:
    """Label-free (AMP): mean over images of the entropy of softmax(τ⁻¹ · cos(image i, image j)), j ≠ i.

    τ⁻¹ is ``inv_temperature`` (AMP uses 15–20), by default the model's logit scale. Needs ≥ 2 images.
    """
    if inv_temperature is not None:  # a positive number (checked with params.yaml, clipprune.config)
        scale = float(inv_temperature)
    batch = image_features.shape[0]
    if batch < 2:
        raise ParamError(f"score.loss=entropy needs at least 2 images per batch, got a batch of {batch} "
                         f"(choose score.batch_size so that no batch holds a single sample)")
    image = F.normalize(image_features, dim=-1)
    self_pairs = torch.eye(batch, dtype=torch.bool, device=image.device)
    logits = (scale * image @ image.T).masked_fill(self_pairs, float("-inf"))
    log_p = F.log_softmax(logits, dim=-1)
    # p·log p with the excluded diagonal contributing 0 (not 0·(-inf) = nan)
    plogp = log_p.exp() * log_p.masked_fill(self_pairs, 0.0)
    return -plogp.sum(dim=-1).mean()


def _entropy_of_rows(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


@register_loss("entropy_image_text", uses_text=True, min_batch=2)
def entropy_image_text(image_features: torch.Tensor, text_features: torch.Tensor, scale,
                       inv_temperature=None) -> torch.Tensor:
    """Label-free image–text entropy (AMP's variant): mean of the image→text and text→image row entropies
    of softmax(τ⁻¹ · cos(image, caption)); τ⁻¹ is ``inv_temperature``, by default the model's logit scale."""
    if inv_temperature is not None:  # a positive number (checked with params.yaml, clipprune.config)
        scale = float(inv_temperature)
    if text_features is None or text_features.shape[0] != image_features.shape[0]:
        raise ValueError("entropy_image_text needs one caption feature per image")
    if image_features.shape[0] < 2:
        raise ParamError(f"score.loss=entropy_image_text needs at least 2 images per batch, got a batch of "
                         f"{image_features.shape[0]}")
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return (_entropy_of_rows(logits) + _entropy_of_rows(logits.T)) / 2


@register_loss("max_logit", min_batch=2)
def max_logit(image_features: torch.Tensor, text_features: torch.Tensor, scale, texts_per_class: int = 1,
              ) -> torch.Tensor:
    """Mean over images of the largest logit ``scale · cos(image, candidate)`` over the candidate texts.

    ``texts_per_class`` > 1: the text features come in consecutive groups of that many prompts per class and
    each class's candidate is the renormalised mean of its normalised prompts (the zero-shot classifier).
    The captions are candidates, never labels: the loss is invariant to permuting the texts.
    """
    if text_features is None or text_features.shape[0] == 0:
        raise ValueError("max_logit loss needs at least one candidate text feature")
    if text_features.shape[0] % texts_per_class:
        raise ParamError(f"score.options.texts_per_class={texts_per_class} does not divide the "
                         f"{text_features.shape[0]} candidate texts")
    text = F.normalize(text_features, dim=-1)
    if texts_per_class > 1:
        text = F.normalize(text.view(-1, texts_per_class, text.shape[-1]).mean(dim=1), dim=-1)
    logits = scale * F.normalize(image_features, dim=-1) @ text.T
    return logits.max(dim=1).values.mean()
