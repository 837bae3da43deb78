"""Batch losses for gradient-based scoring (registry looked up by ``score.loss``).

A loss is ``fn(image_features, text_features, scale, **options) -> scalar`` over the features of one batch
(``[batch, dim]`` each, not normalised: every loss L2-normalises inside) and the model's logit scale. It is
a *mean* over the batch; the per-sample criterion multiplies it by the batch size to get the summed loss.
Losses that ignore the captions are registered with ``uses_text=False`` and get ``text_features=None``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from clipprune.errors import ParamError

LossFn = Callable[..., torch.Tensor]

_LOSSES: dict[str, LossFn] = {}
_FIXED_ARGS = ("image_features", "text_features", "scale")


def register_loss(name: str, uses_text: bool = True, min_batch: int = 1) -> Callable[[LossFn], LossFn]:
    """Decorator: register a batch loss under ``name``; unknown options raise a one-line ParamError.

    ``min_batch``: the fewest samples a batch must hold for the loss to be defined.
    """

    def decorate(fn: LossFn) -> LossFn:
        params = inspect.signature(fn).parameters
        known = [p for p in params if p not in _FIXED_ARGS]

        @functools.wraps(fn)
        def loss(image_features, text_features, scale, **options):
            unknown = sorted(set(options) - set(known))
            if unknown:
                raise ParamError(f"score.options: unknown option(s) {', '.join(unknown)} for loss {name!r}; "
                                 f"known: {', '.join(known) or 'none'}")
            return fn(image_features, text_features, scale, **options)

        loss.loss_name = name
        loss.uses_text = uses_text
        loss.min_batch = min_batch
        loss.options = tuple(known)
        _LOSSES[name] = loss
        return loss

    return decorate


def available_losses() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; ParamError naming ``score.loss`` otherwise."""
    if not isinstance(name, str) or name not in _LOSSES:
        raise ParamError(f"score.loss must be one of {', '.join(sorted(_LOSSES))}; got {name!r}")
    return _LOSSES[name]


def check_loss_options(name: str, options: dict) -> None:
    """ParamError for options the loss does not take (before any data is touched)."""
    loss = get_loss(name)
    unknown = sorted(set(options) - set(loss.options))
    if unknown:
        raise ParamError(f"score.options: unknown option(s) {', '.join(unknown)} for loss {name!r}; "
                         f"known: {', '.join(loss.options) or 'none'}")


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
