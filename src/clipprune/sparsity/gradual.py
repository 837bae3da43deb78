"""Gradual pruning and one-shot + fine-tune (CAP's two other workflows; Zhu & Gupta 2017 schedule).

``run_gradual`` prunes the Linear layers of ``sparsity.towers`` in ``gradual.steps`` steps with the one-shot
``gradual.method`` (null: ``sparsity.method``) and ``gradual.mask_type`` (gradients, Fisher or layer inputs recomputed on the current model at every step, with the
one-shot stage's memory bounds ``chunk_layers`` / ``offload``), and after each step fine-tunes the model
against the dense teacher with the distillation code (``distill.loss`` KL or MSE, its AdamW / lr schedule
options) for ``gradual.epochs``. Between pruning steps the masks are fixed (``FixedMasks``): gradients of
pruned weights are zeroed before the optimiser sees them, and the weights are set back to +0.0 after every
optimiser step, so a pruned weight stays exactly zero. ``steps: 1`` is one-shot + fine-tune.

A checkpoint after every pruning step (the whole model state, the history, the RNG states; one safetensors
file in distill's checkpoint format) lets a killed run resume at the next step with the bits an
uninterrupted run has: every random choice depends only on ``(seed, step)``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from clipprune.config import GradualSection
from clipprune.distill.checkpoint import Checkpoint, check_against, load_checkpoint, restore_rng, rng_state, \
    save_checkpoint
from clipprune.distill.config import DistillConfig
from clipprune.distill.data import TrainImages
from clipprune.distributed import DistContext
from clipprune.distill.train import TrainingLogger, check_schedule, plan_training, train
from clipprune.errors import ClipPruneError
from clipprune.models.base import ClipModel

from .config import SparsityConfig
from .layers import prunable_linears
from .run import apply_weights, sparsify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradualConfig:
    """The ``gradual:`` params section (see params.yaml)."""

    method: str | None = "magnitude"  # None: sparsity.method
    mask_type: str = "unstructured"
    initial: float = 0.5
    final: float = 0.9
    steps: int = 2
    epochs: int = 1
    ramp: str = "cubic"
    num_samples: int | None = 64
    num_grads: int = 64
    warmup_steps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def gradual_config(section: GradualSection) -> GradualConfig:
    return GradualConfig(**{name: getattr(section, name) for name in GradualConfig.__dataclass_fields__})


def gradual_schedule(initial: float, final: float, steps: int, ramp: str = "cubic") -> list[float]:
    """Sparsity after each of the ``steps`` pruning steps: ``initial`` first, ``final`` last.

    cubic (Zhu & Gupta 2017): ``s_k = final + (initial − final)(1 − k/(steps−1))³`` for k = 0 … steps−1, which
    prunes fast while many redundant weights remain and slowly near the end; linear: equal increments.
    One step is one-shot to ``final``.
    """
    if steps == 1:
        return [final]
    out = []
    for k in range(steps):
        frac = k / (steps - 1)
        out.append(final + (initial - final) * (1 - frac) ** 3 if ramp == "cubic"
                   else initial + (final - initial) * frac)
    out[-1] = final
    return out


class FixedMasks:
    """Hold the zeros of ``keep`` fixed while an optimiser trains ``layers`` (a context manager).

    Entering zeroes the pruned weights and hooks each weight's gradient so pruned entries get a zero gradient
    (a fresh AdamW then keeps zero moments for them); ``rezero()``, called after every optimiser step, writes
    +0.0 back, which also undoes what momentum or weight decay from earlier steps would move.
    """

    def __init__(self, layers: dict[str, nn.Linear], keep: dict[str, torch.Tensor]):
        self.weights = {name: layers[name].weight for name in keep}
        self.keep = {name: mask.to(self.weights[name].device, torch.bool) for name, mask in keep.items()}
        self.handles = []

    def __enter__(self) -> "FixedMasks":
        for name, weight in self.weights.items():
            keep = self.keep[name]
            if not weight.requires_grad:
                weight.requires_grad_(True)  # a hook needs it; the trainer sets what trains itself
            self.handles.append(weight.register_hook(
                lambda grad, keep=keep: torch.where(keep, grad, torch.zeros((), dtype=grad.dtype,
                                                                            device=grad.device))))
        self.rezero()
        return self

    @torch.no_grad()
    def rezero(self) -> None:
        for name, weight in self.weights.items():
            weight.masked_fill_(~self.keep[name], 0.0)

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Offset(TrainingLogger):
    """Forwards the trainer's per-run step numbers shifted by the optimiser steps of earlier pruning steps."""

    def __init__(self, inner: TrainingLogger, offset: int):
        self.inner, self.offset = inner, offset

    def step(self, step: int, loss: float, lr: float) -> None:
        self.inner.step(self.offset + step, loss, lr)

    def epoch(self, epoch: int, step: int, loss: float) -> None:
        self.inner.epoch(epoch, self.offset + step, loss)


class GradualLogger(TrainingLogger):
    """Also receives one call per pruning step (``prune_step``); the default does nothing."""

    def prune_step(self, step: int, index: int, target: float, sparsity: float, loss: float) -> None:
        pass


@dataclass
class GradualResult:
    weights: dict[str, torch.Tensor]  # the pruned layers' final weights (after the last fine-tuning)
    history: list = field(default_factory=list)  # per pruning step: target, sparsity, loss, times
    schedule: list = field(default_factory=list)
    optimizer_steps: int = 0
    resumed_after_step: int | None = None


def zero_fraction(layers: dict[str, nn.Linear]) -> float:
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    return zeros / max(1, sum(layer.weight.numel() for layer in layers.values()))


def run_gradual(model: ClipModel, teacher: ClipModel, sparsity: SparsityConfig, gradual: GradualConfig,
                distill: DistillConfig, loader, data: TrainImages, *, seed: int = 0,
                checkpoint: Path | None = None, fingerprint: str = "", ctx: DistContext | None = None,
                logger: GradualLogger | None = None, progress: bool = True,
                after_prune_step: Callable[[int], None] | None = None) -> GradualResult:
    """Prune ``model`` in place by ``gradual``'s schedule, fine-tuning between steps (see the module docstring).

    ``distill`` gives the loss and optimiser options of the fine-tuning (its mode, epochs, warm-up and towers
    are replaced by distillation of ``sparsity.towers`` for ``gradual.epochs`` with ``gradual.warmup_steps``).
    ``after_prune_step(k)`` runs after the checkpoint of step k (1-based) is written.
    """
    ctx = ctx or DistContext()
    logger = logger if (logger is not None and ctx.is_main) else GradualLogger()
    schedule = gradual_schedule(gradual.initial, gradual.final, gradual.steps, gradual.ramp)
    tune = replace(distill, mode="distill", towers=sparsity.towers, epochs=gradual.epochs,
                   warmup_steps=gradual.warmup_steps, num_samples=gradual.num_samples)
    check_schedule(tune, len(data))  # a batch or warm-up that does not fit fails before any pruning
    layers = prunable_linears(model, sparsity.towers)
    step_config = replace(sparsity, method=gradual.method or sparsity.method, mask_type=gradual.mask_type,
                          num_grads=gradual.num_grads, num_recomputations=1)
    start, history, optimizer_steps, resumed = 0, [], 0, None
    if checkpoint is not None and checkpoint.is_file():
        ckpt = load_checkpoint(checkpoint, fingerprint)
        state = model.module.state_dict()
        check_against(checkpoint, ckpt, state, {})
        model.module.load_state_dict(ckpt.model, strict=True)
        restore_rng(ckpt.rng)
        start, history, optimizer_steps, resumed = ckpt.epoch, list(ckpt.history), ckpt.step, ckpt.epoch
        log.info("gradual: resumed after pruning step %d of %d", start, gradual.steps)
    for k in range(start, gradual.steps):
        target = schedule[k]
        began = time.perf_counter()
        before = {name: layer.weight.detach() == 0 for name, layer in layers.items()}
        weights = sparsify(model, replace(step_config, targets=(target,)), loader, seed=seed + k,
                           progress=progress).weights[target]
        for name, was_zero in before.items():
            revived = int((was_zero & (weights[name] != 0)).sum())
            if revived:
                raise ClipPruneError(f"gradual: pruning step {k + 1} of method {step_config.method} gave "
                                     f"{revived} weights of layer {name} pruned before a non-zero value (masks "
                                     f"must only grow)")
        apply_weights(model, weights, sparsity.towers)
        pruned_s = time.perf_counter() - began
        keep = {name: weight != 0 for name, weight in weights.items()}
        step_tune = replace(tune, seed=seed + k)
        with FixedMasks(layers, keep) as fixed:
            plan = plan_training(model, teacher, step_tune)
            result = train(model, teacher, data, step_tune, plan, ctx=ctx, logger=_Offset(logger, optimizer_steps),
                           progress=progress, after_step=lambda _step: fixed.rezero())
        if result.model is not model:
            raise ClipPruneError("gradual: the fine-tuning returned another model (mask scales are not trained here)")
        for name, mask in keep.items():
            moved = int((~mask & (layers[name].weight != 0)).sum())
            if moved:
                raise ClipPruneError(f"gradual: {moved} pruned weights of layer {name} left zero during fine-tuning")
        optimizer_steps += result.steps
        reached = zero_fraction(layers)
        loss = result.history[-1]["loss"]
        history.append({"step": k + 1, "target": target, "sparsity": reached, "loss": loss,
                        "optimizer_steps": optimizer_steps, "prune_s": pruned_s,
                        "tune_s": time.perf_counter() - began - pruned_s})
        logger.prune_step(optimizer_steps - 1, k + 1, target, reached, loss)
        log.info("gradual: step %d/%d at %.4f sparsity, fine-tuning loss %.4g", k + 1, gradual.steps, reached, loss)
        if checkpoint is not None and ctx.is_main:
            state = {key: value.detach() for key, value in model.module.state_dict().items()}
            save_checkpoint(checkpoint, Checkpoint(epoch=k + 1, step=optimizer_steps, history=history,
                                                   model=state, rng=rng_state()), fingerprint)
        ctx.barrier()
        if after_prune_step is not None:
            after_prune_step(k + 1)
    model.module.requires_grad_(False)
    final = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    return GradualResult(final, history, schedule, optimizer_steps, resumed)
