"""The ``distill`` params section, validated into a ``DistillConfig``; learning-rate rules; LFPR schedule.

Every check raises ``ParamError`` with one line naming the ``distill.*`` key. The learning rate follows the
AMP recipe: peak ``base_lr × global_batch / 256``, linear warm-up, cosine decay to ``min_lr``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..errors import ParamError
from ..params import get, get_bool, get_float, get_int, get_str

MODES = ("distill", "retrain")
LOSSES = ("mse", "kl")
KL_PAIRS = ("image_text", "image_image")
TOWER_CHOICES = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}
DEVICES = ("auto", "cpu", "cuda")
REFERENCE_BATCH = 256  # lr scaling: base_lr is the rate for a global batch of 256


@dataclass(frozen=True)
class RetrainRow:
    """One row of the LFPR schedule: at a kept-parameter share >= ``keep``, use ``data`` of the retraining
    images and train the top ``blocks`` blocks of each trained tower (the masks always train)."""

    keep: float
    data: float
    blocks: int


DEFAULT_RETRAIN_SCHEDULE = (
    RetrainRow(0.2, 1.0, 3), RetrainRow(0.3, 0.86, 2), RetrainRow(0.4, 0.73, 2), RetrainRow(0.5, 0.6, 1),
    RetrainRow(0.6, 0.1, 0),
)


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


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Peak learning rate for a global batch: ``base_lr × global_batch / 256`` (linear scaling rule)."""
    return base_lr * global_batch / REFERENCE_BATCH


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak``, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def parse_schedule(raw: Any, key: str = "distill.retrain.schedule") -> tuple[RetrainRow, ...]:
    """A list of ``{keep, data, blocks}`` rows with strictly increasing ``keep``; ParamError naming ``key``."""
    if not isinstance(raw, list) or not raw:
        raise ParamError(f"{key} must be a non-empty list of {{keep, data, blocks}} rows, got {raw!r}")
    rows = []
    for i, row in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(row, dict) or set(row) != {"keep", "data", "blocks"}:
            raise ParamError(f"{where} must be a mapping with exactly keep, data and blocks, got {row!r}")
        keep = float(row["keep"]) if _number(row["keep"]) else None
        data = float(row["data"]) if _number(row["data"]) else None
        blocks = row["blocks"]
        if keep is None or not 0 < keep <= 1:
            raise ParamError(f"{where}.keep must be a number in (0, 1], got {row['keep']!r}")
        if data is None or not 0 < data <= 1:
            raise ParamError(f"{where}.data must be a number in (0, 1], got {row['data']!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ParamError(f"{where}.blocks must be an integer >= 0, got {blocks!r}")
        if rows and keep <= rows[-1].keep:
            raise ParamError(f"{where}.keep must be greater than the previous row's ({rows[-1].keep}), got {keep}")
        rows.append(RetrainRow(keep, data, blocks))
    return tuple(rows)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def retrain_row(schedule: Sequence[RetrainRow], keep_ratio: float) -> RetrainRow:
    """Step lookup: the row with the largest ``keep`` <= ``keep_ratio`` (the first row below the table)."""
    chosen = schedule[0]
    for row in schedule:
        if row.keep <= keep_ratio + 1e-12:
            chosen = row
    return chosen


def parse_distill_params(params: dict) -> DistillConfig:
    """Validate the ``distill`` section (and ``seed``) of params.yaml."""
    if not isinstance(get(params, "distill"), dict):
        raise ParamError(f"distill must be a mapping of distillation settings, got {get(params, 'distill')!r}")
    enabled = get_bool(params, "distill.enabled")
    num_samples = get(params, "distill.num_samples", default=None)
    if num_samples is not None:
        num_samples = get_int(params, "distill.num_samples", min_value=1)
    logit_scale = get(params, "distill.logit_scale", default=None)
    if logit_scale is not None:
        logit_scale = get_float(params, "distill.logit_scale", low=0.0, low_open=True)
    towers = get_str(params, "distill.towers", choices=list(TOWER_CHOICES))
    batch_size = get_int(params, "distill.batch_size", min_value=1)
    nproc = get_int(params, "distill.nproc", min_value=1)
    if batch_size % nproc:
        raise ParamError(f"distill.batch_size must be divisible by distill.nproc ({nproc}) so every process "
                         f"gets an equal share of the global batch, got {batch_size}")
    mode = get_str(params, "distill.mode", choices=MODES)
    schedule = DEFAULT_RETRAIN_SCHEDULE
    raw_schedule = get(params, "distill.retrain.schedule", default=None)
    if raw_schedule is not None or mode == "retrain":
        schedule = parse_schedule(get(params, "distill.retrain.schedule"))
    mask_lr_scale = get_float(params, "distill.retrain.mask_lr_scale", low=0.0, low_open=True, default=10.0)
    base_lr = get_float(params, "distill.base_lr", low=0.0, low_open=True)
    min_lr = get_float(params, "distill.min_lr", low=0.0, default=0.0)
    if min_lr > scaled_lr(base_lr, batch_size):
        raise ParamError(f"distill.min_lr must not exceed the peak lr base_lr*batch_size/256 = "
                         f"{scaled_lr(base_lr, batch_size):g}, got {min_lr}")
    return DistillConfig(
        enabled=enabled,
        mode=mode,
        loss=get_str(params, "distill.loss", choices=LOSSES),
        kl_pairs=get_str(params, "distill.kl_pairs", choices=KL_PAIRS, default="image_text"),
        logit_scale=logit_scale,
        towers=TOWER_CHOICES[towers],
        num_samples=num_samples,
        epochs=get_int(params, "distill.epochs", min_value=1),
        batch_size=batch_size,
        base_lr=base_lr,
        min_lr=min_lr,
        warmup_steps=get_int(params, "distill.warmup_steps", min_value=0),
        weight_decay=get_float(params, "distill.weight_decay", low=0.0),
        nproc=nproc,
        device=get_str(params, "distill.device", choices=DEVICES, default="auto"),
        seed=get_int(params, "seed", min_value=0),
        retrain_schedule=schedule,
        mask_lr_scale=mask_lr_scale,
    )


def fingerprint(config: DistillConfig, **inputs: Any) -> str:
    """sha256 over the training fields of ``config`` and the given inputs (model names, file digests...)."""
    payload = json.dumps({"config": config.training_fields(), "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
