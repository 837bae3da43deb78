"""LFPR's label-free criterion: importance = Σ_batches (∂L/∂mask)², L = Σ over the batch of the model's top logit.

LFPR scores a classifier without labels: its loss is the sum, over the samples of a batch, of the model's own
largest output logit, and a unit's importance is the squared mask gradient of that loss summed over batches.
A CLIP model has no classification head; its "logits" are the image–text similarity logits
``logit_scale · cos(image, text)``, so the loss here is, for every image, the largest such logit over a set of
candidate texts (``score.options.text_set``):

* ``batch`` (default): the captions of the same batch. They are only the candidates the image is compared
  with, never a label: which caption was paired with which image does not change the loss (a permutation of
  the batch's captions gives the same scores), unlike the contrastive loss. Works on any captions data
  (COCO has no class set) and reaches the text tower too (the winning caption's features carry gradient).
  Needs at least 2 images per batch (with a single caption the "max" would be its own pair's logit).
* ``prompts``: a fixed set of classes, the model's own zero-shot classifier — what LFPR's classifier logits
  become for CLIP. Options ``classnames`` and ``templates`` name the JSON files of the evaluate stage
  (paths relative to the working directory, e.g. ``data/raw/digits/digits/classification/classnames.json``);
  each class's candidate is the renormalised mean of its normalised prompt embeddings, encoded through the
  masked text tower every batch so text masks get gradients too. With ``granularity: sample`` only the
  vision tower can be scored (per-sample masks cannot be shared with the prompts).

The gradient machinery is Kwon's Fisher (``fisher.fisher_scores``) run with the ``max_logit`` loss (defined in
``losses``; ``score.loss: max_logit`` also works with ``fisher`` and ``abs_gradient``). Registered losses are batch
means; LFPR's loss is the batch *sum*, so for ``granularity: batch`` each gradient row is multiplied by its
batch size (rows = gradients of the summed loss, as LFPR squares them) and the scores are recomputed from
those rows. Per-sample rows are already the gradients of each sample's own term of the sum. ``score.loss``
is not used by ``label_free`` (the meta records ``loss: max_logit``).
"""
from __future__ import annotations

from typing import Iterator

import torch

from clipprune.errors import ParamError
from clipprune.models.base import ClipModel

from .fisher import fisher_scores
from .registry import GRADS_SUFFIX, ScoreResult, register_criterion

LOSS = "max_logit"


class _SizedBatches:
    """Iterates a calibration loader, swapping captions for fixed prompt tokens and recording batch sizes."""

    def __init__(self, loader, prompt_tokens: torch.Tensor | None, min_images: int):
        self.loader, self.prompt_tokens, self.min_images = loader, prompt_tokens, min_images
        self.sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        self.sizes = []
        for images, captions in self.loader:
            size = int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)
            if size < self.min_images:
                raise ParamError(f"score.batch_size: batch {len(self.sizes)} holds {size} image(s), but "
                                 f"criterion label_free with text_set=batch needs at least {self.min_images} "
                                 f"(one caption alone would act as a label); change score.batch_size or "
                                 f"calibrate.num_samples, or use score.options.text_set: prompts")
            self.sizes.append(size)
            yield images, captions if self.prompt_tokens is None else self.prompt_tokens


def _prompt_tokens(model: ClipModel, classnames, templates) -> tuple[torch.Tensor, int, int]:
    """Token ids of every template filled with every class (class-major), #classes, #templates."""
    from clipprune.data.imagefolder import load_classnames, load_templates
    from clipprune.evaluate.zeroshot import fill_template

    names, filled = load_classnames(classnames), load_templates(templates)
    texts = [fill_template(template, name) for name in names for template in filled]
    return model.tokenizer(texts), len(names), len(filled)


@register_criterion("label_free")
def label_free_scores(model: ClipModel, loader, *, towers, loss, granularity, progress, text_set: str = "batch",
                      classnames: str | None = None, templates: str | None = None,
                      keep_grads: bool = True) -> ScoreResult:
    """LFPR importance Σ_rows (∂ Σ_batch max-logit / ∂mask)² (see the module docstring).

    ``text_set``: ``"batch"`` (the batch's captions as candidates) or ``"prompts"`` (zero-shot classifier
    from the ``classnames`` and ``templates`` JSON files). ``keep_grads=False`` drops the gradient rows from
    the result. ``loss`` (``score.loss``) is ignored: the loss is always ``max_logit``.
    """
    if loader is None:
        raise ParamError("score.criterion=label_free needs calibration data (a loader of image-caption batches)")

    prompt_tokens, num_classes, per_class = None, None, 1
    if text_set == "prompts":
        prompt_tokens, num_classes, per_class = _prompt_tokens(model, classnames, templates)
        prompt_tokens = prompt_tokens.to(next(model.parameters()).device)
    batches = _SizedBatches(loader, prompt_tokens, min_images=2 if text_set == "batch" else 1)
    # the registered fisher re-validates and renames the meta; its undecorated body is the machinery we reuse
    result = fisher_scores.__wrapped__(model, batches, towers=towers, loss=LOSS, granularity=granularity,
                                       progress=progress, keep_grads=True, texts_per_class=per_class)

    scores, grads = {}, {}
    for key in result.scores:
        rows = result.grads[key + GRADS_SUFFIX]
        if granularity == "batch":  # gradient of the batch mean × batch size = gradient of LFPR's batch sum
            rows = rows * torch.tensor(batches.sizes, dtype=rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
        scores[key] = rows.double().pow(2).sum(0).float()
        if keep_grads:
            grads[key + GRADS_SUFFIX] = rows
    meta = {**result.meta, "loss": LOSS, "loss_options": {}, "text_set": text_set,
            "grad_rows": "sample" if granularity == "sample" else "batch (gradient of the batch sum)"}
    meta.pop("mean_loss", None)
    meta["mean_max_logit"] = result.meta["mean_loss"]
    if text_set == "prompts":
        meta.update(num_classes=num_classes, num_templates=per_class)
    return ScoreResult(scores=scores, grads=grads, meta=meta)
