"""The training loop: distillation (AMP) and adaptive retraining (LFPR) of a pruned student.

* ``plan_training`` decides what trains: in ``distill`` mode every parameter of the towers in
  ``distill.towers``; in ``retrain`` mode the top blocks and data share that the LFPR schedule gives for the
  student's kept-parameter share, plus per-head / per-neuron mask scales (applied by ``models.masks`` hooks,
  folded into the weights by ``prune_model`` at the end).
* ``train`` runs AdamW with linear warm-up and cosine decay, checkpointing after every epoch and resuming
  from the last complete epoch. Data order and every random choice depend only on ``(seed, epoch)``, so a
  resumed run ends with the same bits as an uninterrupted one. The models stay in eval mode: CLIP towers have
  no dropout, and eval keeps every forward deterministic.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import check_warmup
from ..errors import ParamError
from ..models.base import ClipModel
from ..models.masks import apply_masks, full_masks
from ..models.prune import prune_model
from ..progress import progress_bar
from .checkpoint import Checkpoint, check_against, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .config import DistillConfig, RetrainRow, lr_at, retrain_row
from .data import TrainImages, epoch_plan, shard, steps_per_epoch
from ..distributed import DistContext
from .features import keep_ratio, named_trainables, top_block_parameters
from .losses import Batch, distill_loss


@dataclass(frozen=True)
class TrainingPlan:
    """What a run trains and on how much data."""

    mode: str
    towers: tuple[str, ...]
    keep_ratio: float  # kept share of the prunable parameters of ``towers``
    data_share: float  # share of the selected training images used
    top_blocks: int | None  # retrain: trainable top blocks per tower (None: whole towers)
    train_masks: bool
    schedule_row: RetrainRow | None = None

    def as_dict(self) -> dict:
        return {"mode": self.mode, "towers": list(self.towers), "keep_ratio": self.keep_ratio,
                "data_share": self.data_share, "top_blocks": self.top_blocks, "train_masks": self.train_masks}


def plan_training(student: ClipModel, dense: ClipModel, config: DistillConfig) -> TrainingPlan:
    """The training plan for ``config``; retrain mode looks the keep ratio up in the LFPR schedule."""
    ratio = keep_ratio(student, dense, config.towers)
    if config.mode != "retrain":
        return TrainingPlan(config.mode, config.towers, ratio, 1.0, None, False)
    row = retrain_row(config.retrain_schedule, ratio)
    return TrainingPlan("retrain", config.towers, ratio, row.data, row.blocks, True, row)


@dataclass
class TrainResult:
    model: ClipModel  # the trained student, mask scales folded in
    history: list = field(default_factory=list)  # per epoch: {"epoch", "loss", "steps"}
    steps: int = 0
    resumed_from_epoch: int | None = None


class TrainingLogger:
    """Receives progress on the main process (e.g. dvclive); the default does nothing."""

    def step(self, step: int, loss: float, lr: float) -> None:
        pass

    def epoch(self, epoch: int, step: int, loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def _trainable(student: ClipModel, plan: TrainingPlan) -> list[torch.nn.Parameter]:
    if plan.top_blocks is None:
        params = [p for tower in plan.towers for p in student.tower_parameters(tower)]
    else:
        params = [p for tower in plan.towers for p in top_block_parameters(student, tower, plan.top_blocks)]
    return list(dict.fromkeys(params))  # unique, stable order


def _optimizer(named: list[tuple[str, torch.Tensor]], masks: dict[str, torch.Tensor],
               config: DistillConfig) -> torch.optim.AdamW:
    # weight decay on matrices only: biases, norms, embeddings' vectors and mask scales are left alone
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": list(masks.values()), "weight_decay": 0.0, "lr_scale": config.mask_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.peak_lr, betas=(0.9, 0.999),
                             eps=1e-8, foreach=False)


def check_schedule(config: DistillConfig, images: int) -> tuple[int, int]:
    """``(steps per epoch, total steps)`` of a run on ``images`` images; ParamError if the batch or warm-up
    does not fit. Cheap: callers run it before anything is written or deleted."""
    steps = steps_per_epoch(images, config.batch_size)
    if steps < 1:
        raise ParamError(f"distill.batch_size must be <= the {images} training images, got {config.batch_size}")
    total_steps = steps * config.epochs
    check_warmup(config.warmup_steps, total_steps, steps, config.epochs)  # before any training step
    return steps, total_steps


def train(student: ClipModel, teacher: ClipModel, data: TrainImages, config: DistillConfig, plan: TrainingPlan,
          *, checkpoint_path: Path | None = None, fingerprint: str = "", ctx: DistContext | None = None,
          logger: TrainingLogger | None = None, progress: bool = True,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``student`` towards ``teacher`` (both on ``ctx.device``); returns the student with masks folded.

    With ``checkpoint_path``, a checkpoint there (from a run with the same ``fingerprint``) is resumed, and a
    new one is written after every epoch by the main process.
    """
    ctx = ctx or DistContext()
    logger = logger if (logger is not None and ctx.is_main) else TrainingLogger()
    steps, total_steps = check_schedule(config, len(data))
    torch.manual_seed(config.seed)

    teacher.module.eval().requires_grad_(False)
    student.module.eval().requires_grad_(False)
    params = _trainable(student, plan)
    for p in params:
        p.requires_grad_(True)
    named = list(named_trainables(student, params))
    masks = full_masks(student, plan.towers, requires_grad=True) if plan.train_masks else {}
    optimizer = _optimizer(named, masks, config)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]

    start_epoch, step, history, resumed = 0, 0, [], None
    if checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path, fingerprint)
        check_against(checkpoint_path, ckpt, dict(named), masks)
        with torch.no_grad():
            for name, p in named:
                p.copy_(ckpt.model[name])
            for key, mask in masks.items():
                mask.copy_(ckpt.masks[key])
        optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng)
        start_epoch, step, history, resumed = ckpt.epoch, ckpt.step, list(ckpt.history), ckpt.epoch

    hooks = apply_masks(student, masks) if masks else contextlib.nullcontext()
    with hooks:
        for epoch in range(start_epoch, config.epochs):
            plan_e = epoch_plan(len(data), config.batch_size, config.seed, epoch)
            losses = []
            bar = progress_bar(zip(plan_e.batches, plan_e.caption_picks), total=steps,
                               enabled=progress and ctx.is_main, desc=f"distill epoch {epoch + 1}/{config.epochs}")
            for positions, picks in bar:
                lr = lr_at(step, total_steps, config.peak_lr, config.warmup_steps, config.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                images, captions = data.batch(shard(positions, ctx.rank, ctx.world), shard(picks, ctx.rank, ctx.world))
                batch = Batch(images.to(ctx.device), captions)
                loss = distill_loss(student, teacher, batch, config, ctx)
                if not torch.isfinite(loss):
                    raise ParamError(f"distill.base_lr={config.base_lr} made the loss diverge (non-finite at "
                                     f"step {step}); lower distill.base_lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                ctx.average_gradients(ordered)
                optimizer.step()
                value = float(ctx.mean(loss))
                losses.append(value)
                logger.step(step, value, lr)
                bar.set_postfix(loss=f"{value:.4g}")
                step += 1
                if after_step is not None:
                    after_step(step)
            history.append({"epoch": epoch + 1, "loss": math.fsum(losses) / len(losses), "steps": len(losses)})
            logger.epoch(epoch + 1, step - 1, history[-1]["loss"])
            if checkpoint_path is not None and ctx.is_main:
                state = Checkpoint(epoch=epoch + 1, step=step, history=history,
                                   model={n: p.detach() for n, p in named},
                                   masks={k: m.detach() for k, m in masks.items()},
                                   optimizer=_indexed_state(optimizer), rng=rng_state())
                save_checkpoint(checkpoint_path, state, fingerprint)
            ctx.barrier()

    student.module.requires_grad_(False)
    final = prune_model(student, {k: m.detach() for k, m in masks.items()}) if masks else student
    final.module.requires_grad_(False)
    return TrainResult(model=final, history=history, steps=step, resumed_from_epoch=resumed)


def _indexed_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with JSON-ready param groups (tuples as lists)."""
    state = optimizer.state_dict()
    groups = []
    for group in state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return {"state": state["state"], "param_groups": groups}
