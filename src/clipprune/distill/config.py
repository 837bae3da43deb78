"""``DistillConfig``: the ``distill`` params section as the trainer takes it; learning-rate rules; LFPR schedule.

The section is validated by ``clipprune.config`` (``DistillSection``; the schedule rows and the lr scaling
rule live there too). The learning rate follows the AMP recipe: peak ``base_lr × global_batch / 256``,
linear warm-up, cosine decay to ``min_lr``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..config import (DEFAULT_RETRAIN_SCHEDULE, DistillSection, RetrainRow, parse_params, parse_schedule,
                      scaled_lr)

__all__ = ["DEFAULT_RETRAIN_SCHEDULE", "DistillConfig", "RetrainRow", "distill_config", "fingerprint", "lr_at",
           "parse_distill_params", "parse_schedule", "retrain_row", "scaled_lr"]


@dataclass(frozen=True)
class DistillConfig:
    """Validated ``distill.*`` params (plus the global seed)."""

    enabled: bool = True
    mode: str = "distill"
    loss: str = "mse"
    kl_pairs: str = "image_text"
    logit_scale: float | None = None  # similarity multiplier of kl / retrain; None = each model's own
    towers: tuple[str, ...] = ("vision",)
    num_samples: int | None = None  # training images drawn from the train split (None = all)
    epochs: int = 5
    batch_size: int = 64  # global batch, split evenly across processes
    base_lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    nproc: int = 1
    device: str = "auto"
    seed: int = 0
    retrain_schedule: tuple[RetrainRow, ...] = field(default=DEFAULT_RETRAIN_SCHEDULE)
    mask_lr_scale: float = 10.0  # retrain: mask scales (about 1) learn at this multiple of the weights' lr

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.base_lr, self.batch_size)

    def training_fields(self) -> dict:
        """What determines the trained weights (not ``enabled``, ``nproc`` or ``device``)."""
        out = asdict(self)
        for key in ("enabled", "nproc", "device"):
            out.pop(key)
        out["towers"] = list(self.towers)
        out["retrain_schedule"] = [asdict(r) for r in self.retrain_schedule]
        return out


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak``, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def retrain_row(schedule: Sequence[RetrainRow], keep_ratio: float) -> RetrainRow:
    """Step lookup: the row with the largest ``keep`` <= ``keep_ratio`` (the first row below the table)."""
    chosen = schedule[0]
    for row in schedule:
        if row.keep <= keep_ratio + 1e-12:
            chosen = row
    return chosen


def distill_config(section: DistillSection, seed: int) -> DistillConfig:
    """The validated ``distill`` section (``clipprune.config``) and the global seed, as the trainer takes them."""
    fields = {name: getattr(section, name) for name in (
        "enabled", "mode", "loss", "kl_pairs", "logit_scale", "towers", "num_samples", "epochs", "batch_size",
        "base_lr", "min_lr", "warmup_steps", "weight_decay", "nproc", "device")}
    return DistillConfig(**fields, seed=seed, retrain_schedule=section.schedule,
                         mask_lr_scale=section.retrain.mask_lr_scale)


def parse_distill_params(params: dict) -> DistillConfig:
    """``distill_config`` of a whole params mapping (validated by ``clipprune.config.parse_params``)."""
    parsed = parse_params(params, need=("seed", "distill"))
    return distill_config(parsed.distill, parsed.seed)


def fingerprint(config: DistillConfig, **inputs: Any) -> str:
    """sha256 over the training fields of ``config`` and the given inputs (model names, file digests...)."""
    payload = json.dumps({"config": config.training_fields(), "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
