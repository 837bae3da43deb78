"""Distillation losses of a pruned student against its dense teacher (no labels).

* ``mse`` (AMP): mean squared error of the vision tower's projected token features (CLS and patches, see
  ``ClipModel.vision_tokens``); when the text tower trains too, plus the MSE of the text embeddings.
* ``kl``: KL(teacher ‖ student) between softmax distributions of scaled cosine similarities within the
  global batch, image→text and text→image averaged (``image_text``) or image→other images (``image_image``,
  self-similarity left out).
* retraining (LFPR): cross-entropy of the student's image→text logits over the batch captions against
  the dense model's own best match (pseudo-labels).

Each process holds a shard of the global batch: it computes the rows of its own items against columns
gathered from every process, and returns the mean over its rows. Shards are equal, so the mean over
processes of these losses (what gradient averaging optimises) is the loss of the whole global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.base import ClipModel
from .config import DistillConfig
from ..distributed import DistContext


@dataclass
class Batch:
    """One process's share of a global batch."""

    images: torch.Tensor
    captions: list[str]


def _scale(model: ClipModel, config: DistillConfig) -> torch.Tensor:
    if config.logit_scale is not None:
        return torch.tensor(config.logit_scale)
    return model.logit_scale.detach()


def _encode(model: ClipModel, batch: Batch, trains: bool, tower: str) -> torch.Tensor:
    with torch.set_grad_enabled(trains):
        if tower == "vision":
            return F.normalize(model.encode_image(batch.images), dim=-1)
        tokens = model.tokenizer(batch.captions).to(batch.images.device)
        return F.normalize(model.encode_text(tokens), dim=-1)


def _embeddings(model: ClipModel, batch: Batch, towers, ctx: DistContext, teacher: bool,
                needed=("vision", "text")):
    """Normalised (local, global) image and text embeddings; grad only through trained towers."""
    out = {}
    for tower in needed:
        local = _encode(model, batch, not teacher and tower in towers, tower)
        if teacher:
            local = local.detach()
        out[tower] = (local, ctx.gather(local))
    return out


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    log_target=True, reduction="batchmean")


def mse_loss(student: ClipModel, teacher: ClipModel, batch: Batch, config: DistillConfig) -> torch.Tensor:
    loss = batch.images.new_zeros(())
    if "vision" in config.towers:
        with torch.no_grad():
            target = teacher.vision_tokens(batch.images)
        loss = loss + F.mse_loss(student.vision_tokens(batch.images), target)
    if "text" in config.towers:
        tokens = student.tokenizer(batch.captions).to(batch.images.device)
        with torch.no_grad():
            target = teacher.encode_text(teacher.tokenizer(batch.captions).to(batch.images.device))
        loss = loss + F.mse_loss(student.encode_text(tokens), target)
    return loss


def kl_loss(student: ClipModel, teacher: ClipModel, batch: Batch, config: DistillConfig,
            ctx: DistContext) -> torch.Tensor:
    needed = ("vision",) if config.kl_pairs == "image_image" else ("vision", "text")
    s = _embeddings(student, batch, config.towers, ctx, teacher=False, needed=needed)
    with torch.no_grad():
        t = _embeddings(teacher, batch, config.towers, ctx, teacher=True, needed=needed)
    s_scale, t_scale = _scale(student, config), _scale(teacher, config)
    if config.kl_pairs == "image_image":
        local = batch.images.shape[0]
        self_cols = torch.arange(local, device=batch.images.device) + ctx.rank * local
        hide = torch.zeros(local, local * ctx.world, dtype=torch.bool, device=batch.images.device)
        hide[torch.arange(local), self_cols] = True
        keep = ~hide  # each row over the other images of the global batch
        s_logits = (s_scale * s["vision"][0] @ s["vision"][1].T)[keep].view(local, -1)
        t_logits = (t_scale * t["vision"][0] @ t["vision"][1].T)[keep].view(local, -1)
        return _kl(s_logits, t_logits)
    image_to_text = _kl(s_scale * s["vision"][0] @ s["text"][1].T, t_scale * t["vision"][0] @ t["text"][1].T)
    text_to_image = _kl(s_scale * s["text"][0] @ s["vision"][1].T, t_scale * t["text"][0] @ t["vision"][1].T)
    return 0.5 * (image_to_text + text_to_image)


def pseudo_label_loss(student: ClipModel, teacher: ClipModel, batch: Batch, config: DistillConfig,
                      ctx: DistContext) -> torch.Tensor:
    """Cross-entropy of the student's image→caption logits against the dense model's argmax caption."""
    s = _embeddings(student, batch, config.towers, ctx, teacher=False)
    with torch.no_grad():
        t = _embeddings(teacher, batch, config.towers, ctx, teacher=True)
        labels = (t["vision"][0] @ t["text"][1].T).argmax(dim=-1)
    logits = _scale(student, config) * s["vision"][0] @ s["text"][1].T
    return F.cross_entropy(logits, labels)


def distill_loss(student: ClipModel, teacher: ClipModel, batch: Batch, config: DistillConfig,
                 ctx: DistContext | None = None) -> torch.Tensor:
    """The loss ``config`` asks for on one process's share of the global batch."""
    ctx = ctx or DistContext()
    if config.mode == "retrain":
        return pseudo_label_loss(student, teacher, batch, config, ctx)
    if config.loss == "mse":
        return mse_loss(student, teacher, batch, config)
    return kl_loss(student, teacher, batch, config, ctx)
