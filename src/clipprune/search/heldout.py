"""The held-out loss a model-measuring search (``adaptive``) compares candidate widths by."""
from __future__ import annotations

import torch

from clipprune.errors import DataError
from clipprune.models.base import ClipModel


def heldout_batches(model: ClipModel, holdout, batch_size: int, uses_text: bool, device) -> tuple[list, list]:
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


class HeldOutLoss:
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
