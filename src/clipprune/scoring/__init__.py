"""Importance criteria for heads and neurons (registry: ``get_criterion(params["score"]["criterion"])``).

Built in: ``fisher`` (Kwon et al.: Σ (∂loss/∂mask)² over batches or samples, losses ``contrastive`` and
``entropy``) and ``magnitude`` (weight-norm baseline). ``score_model`` runs one, ``save_scores`` /
``load_scores`` read and write ``scores.safetensors``.
"""
from .registry import (GRADS_SUFFIX, GRANULARITIES, ScoreResult, available_criteria, check_granularity,
                       get_criterion, parse_towers, register_criterion)
from .losses import available_losses, contrastive, entropy, get_loss, register_loss
from . import fisher as _fisher  # noqa: F401  (registers "fisher")
from . import magnitude as _magnitude  # noqa: F401  (registers "magnitude")
from . import taylor_entropy as _taylor_entropy  # noqa: F401  (registers "taylor_entropy", loss "entropy_image_text")
from . import label_free as _label_free, abs_gradient as _abs_gradient  # noqa: F401  (LFPR: "label_free" + loss "max_logit", "abs_gradient")
from .fisher import fisher_scores, frozen_parameters, mask_gradients
from .magnitude import magnitude_scores
from .run import calibration_loader, load_scores, save_scores, score_model

__all__ = [
    "GRADS_SUFFIX", "GRANULARITIES", "ScoreResult", "available_criteria", "available_losses",
    "calibration_loader", "check_granularity", "contrastive", "entropy", "fisher_scores", "frozen_parameters",
    "get_criterion", "get_loss", "load_scores", "magnitude_scores", "mask_gradients", "parse_towers",
    "register_criterion", "register_loss", "save_scores", "score_model",
]
