"""The "absolute gradient" criterion of LFPR's methods table: importance = Σ_rows |∂L/∂mask|.

First-order sensitivity instead of Fisher's squares: the same gradient rows as ``fisher`` (one per batch or
per sample, ``score.granularity``; any registered ``score.loss``, e.g. ``contrastive``, ``entropy`` or the
label-free ``max_logit``), summed in absolute value. The rows come from ``fisher.fisher_scores`` itself, so
they are identical to Fisher's and are stored the same way for rearrangement.
"""
from __future__ import annotations

from clipprune.errors import ParamError
from clipprune.models.base import ClipModel

from .fisher import fisher_scores
from .registry import GRADS_SUFFIX, ScoreResult, register_criterion


@register_criterion("abs_gradient")
def abs_gradient_scores(model: ClipModel, loader, *, towers, loss, granularity, progress, keep_grads: bool = True,
                        **loss_options) -> ScoreResult:
    """Σ_rows |∂loss/∂mask| over batches or samples; ``loss_options`` go to the loss as for ``fisher``."""
    if loss is None:
        raise ParamError("score.loss is required by criterion 'abs_gradient'")
    if loader is None:
        raise ParamError("score.criterion=abs_gradient needs calibration data (a loader of image-caption batches)")
    # fisher's undecorated body: the registered wrapper would relabel the meta as criterion "fisher"
    result = fisher_scores.__wrapped__(model, loader, towers=towers, loss=loss, granularity=granularity,
                                       progress=progress, keep_grads=True, **loss_options)
    scores = {key: result.grads[key + GRADS_SUFFIX].double().abs().sum(0).float() for key in result.scores}
    return ScoreResult(scores=scores, grads=result.grads if keep_grads else {}, meta=dict(result.meta))
