"""Least-squares mask tuning (Kwon et al.): per-layer scales for kept heads and neurons.

With the dense model as teacher, layer by layer (each tower in forward order):

1. **Heads.** The student's post-attention stream is ``h_s = x_s + Σ_h s_h A_h + b`` with
   ``A_h = γ₁ ⊙ W_h c_h`` (``W_h`` the ``out_proj`` columns of head ``h``, ``c_h`` its context, ``γ₁``
   LayerScale, ``b = γ₁ ⊙ out_proj.bias``). The kept heads' scales minimise
   ``Σ_tokens ‖Σ_h s_h A_h − (h_t − x_s − b)‖²`` where ``h_t`` is the teacher's post-attention stream.
2. **Neurons**, with the tuned head scales in place: ``y_s = z_s + Σ_j s_j γ₂ ⊙ W2[:, j] a_j + γ₂ ⊙ b2``
   with ``z_s`` the student's post-attention stream; the target is the teacher's block output ``y_t``.

Both are linear least squares in the scales. Their normal equations ``G s = r`` are accumulated batch by
batch from small statistics only: with ``F`` the features of the kept units (head contexts, MLP
activations) and ``W`` their output columns,

* ``G = groupsum((WᵀW) ⊙ (FᵀF))`` — for heads the ``dh × dh`` blocks are summed, which is
  ``⟨A_h, A_g⟩ = Σ_tokens c_hᵀ (W_hᵀ W_g) c_g`` without ever forming ``A_h``; for neurons it is
  ``(W2ᵀW2) ⊙ (AᵀA)``;
* ``r = groupsum(Σ_tokens F ⊙ (R W))`` with ``R`` the residual target, and ``‖R‖²``.

The reconstruction error of any scales is then ``sᵀGs − 2rᵀs + ‖R‖²`` exactly, so the report's
before/after errors need no extra pass.

**Damping.** ``(G + λI) s = r + λ s₀`` with ``λ = damp · mean(diag G)`` and ``s₀`` the current scales of
the kept units (1 for a binary mask): a ridge pull towards the unscaled mask that is scale-free (relative
to the problem's own diagonal). Because ``s₀`` is feasible, the damped solution never has a larger
reconstruction error than ``s₀``. A sub-block whose solution is non-finite, leaves
``[-max_scale, max_scale]`` or does not lower the error by more than rounding noise (``NOISE_FLOOR``
of ``‖R‖²``) keeps its current (binary) mask; the first two also raise a ``TuningWarning`` naming the
tower and layer. Tuning then continues with the next layers.

Pruned units stay exactly 0. The student is the teacher physically pruned by the current masks
(``models.prune``; identical outputs to the masked teacher), so the inputs of its ``out_proj`` and second
MLP linear are the raw contexts / activations of the kept units and its passes cost only the kept
fraction; accepted scales are written into its weights as the layers are tuned. Cost per layer over the
calibration set: one teacher block, the student's attention half (twice: up to ``out_proj``, then up to
the second MLP linear) and its MLP half, plus one Gram matrix of the kept units' features per batch and
sub-block. Memory: the current layer's hidden states of teacher and student for the whole calibration
set (for ViT-B/32 and 2048 images 2 × 315 MB) and the pruned copy, never per-layer or per-head activations.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..config import parse_towers
from ..distributed import current as data_parallel_context
from ..errors import DataError, ParamError
from ..models.base import ClipModel, EncoderTower
from ..models.masks import mask_key, parse_mask_key, validate_masks
from ..models.precision import AUTOCAST_DTYPES, autocast_forward, full_precision
from ..models.prune import prune_model
from ..progress import progress_bar
from ..models.blocks import BlockCall, capture_block_input
from .capture import (block_parts, iter_tower_batches, mlp_branch, record_input, record_structure, run_until_stop,
                      token_rows, verify_block_structure)

__all__ = ["TuningWarning", "tune_masks", "LeastSquaresStats", "solve_scales"]

# an error reduction smaller than this fraction of ‖R‖² (float32 statistics) is treated as no reduction
NOISE_FLOOR = 1e-6


class TuningWarning(UserWarning):
    """A layer's least-squares scales were rejected; that sub-block keeps its binary mask."""


# ---------------------------------------------------------------------------------------------
# the normal equations
# ---------------------------------------------------------------------------------------------
class LeastSquaresStats:
    """Accumulates ``G``, ``r`` and ``‖R‖²`` of ``min_s Σ_tokens ‖(F ⊙ s_groups) Wᵀ − R‖²``.

    ``columns`` is ``W`` ``[hidden, features]``; consecutive runs of ``group`` features share one scale
    (a head's ``head_dim`` context features; 1 for neurons).
    """

    def __init__(self, columns: torch.Tensor, group: int):
        self.columns = columns.float()
        self.group = group
        features = columns.shape[1]
        if features % group:
            raise ValueError(f"{features} features do not split into groups of {group}")
        self.units = features // group
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=columns.device)
        self.cross = torch.zeros(self.units, dtype=torch.float64, device=columns.device)
        self.target_sq = 0.0
        self.tokens = 0

    @torch.no_grad()
    def add(self, features: torch.Tensor, residual: torch.Tensor) -> None:
        """Add tokens: ``features`` ``[tokens, features]`` of the kept units, ``residual`` ``[tokens, hidden]``.

        In float32 even under ``tune.precision``'s autocast (activations in bf16 / fp16 are widened first)."""
        with full_precision(self.columns.device):
            features, residual = features.float(), residual.float()
            self.gram += (features.t() @ features).double()
            projected = residual @ self.columns  # [tokens, features]: Wᵀ R per token
            self.cross += (features * projected).sum(0).view(self.units, self.group).sum(1).double()
            self.target_sq += float(residual.double().pow(2).sum())
        self.tokens += features.shape[0]

    def reduce(self) -> None:
        """Data parallel (``clipprune.distributed.data_parallel`` with several processes): sum every process's
        ``G``, ``r``, ``‖R‖²`` and token count (an all-reduce; one process: nothing to do)."""
        ctx = data_parallel_context()
        if ctx.world == 1:
            return
        self.gram = ctx.all_reduce_sum(self.gram)
        self.cross = ctx.all_reduce_sum(self.cross)
        self.target_sq = float(ctx.all_reduce_sum(torch.tensor([self.target_sq], dtype=torch.float64))[0])
        self.tokens = int(ctx.all_reduce_sum(torch.tensor([self.tokens], dtype=torch.int64))[0])

    def system(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, r)`` in float64, ``G`` ``[units, units]``."""
        columns = self.columns.double()
        weighted = (columns.t() @ columns) * self.gram
        g = self.group
        G = weighted.view(self.units, g, self.units, g).sum(dim=(1, 3))
        return 0.5 * (G + G.t()), self.cross.clone()

    def error(self, G: torch.Tensor, r: torch.Tensor, scales: torch.Tensor) -> float:
        """``Σ_tokens ‖Σ s_u A_u − R‖²`` for the given scales (exact in exact arithmetic)."""
        s = scales.double()
        return float(s @ G @ s - 2.0 * (r @ s) + self.target_sq)


@dataclass
class Solution:
    scales: torch.Tensor  # solved scales (float64), may be non-finite
    damping: float  # λ actually used
    error_before: float
    error_after: float  # error of the solved scales (nan if non-finite)


def solve_scales(G: torch.Tensor, r: torch.Tensor, start: torch.Tensor, damp: float,
                 error_fn) -> Solution:
    """Solve ``(G + λI) s = r + λ·start`` with ``λ = damp · mean(diag G)``; never raises on singular ``G``."""
    start = start.double()
    diag_mean = float(G.diagonal().mean()) if G.numel() else 0.0
    lam = damp * diag_mean if math.isfinite(diag_mean) else 0.0
    system = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    try:
        scales = torch.linalg.solve(system, r + lam * start)
    except RuntimeError:  # torch.linalg.LinAlgError: exactly singular
        scales = torch.full_like(start, float("nan"))
    before = error_fn(start)
    after = error_fn(scales) if bool(torch.isfinite(scales).all()) else float("nan")
    return Solution(scales, lam, before, after)


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------
def _tuned_towers(model: ClipModel, masks: Mapping[str, torch.Tensor], towers) -> tuple[str, ...]:
    masked = [t for t in model.towers if any(mask_key(t, k) in masks for k in ("head", "neuron"))]
    if towers is None:
        return tuple(masked)
    if isinstance(towers, str):
        towers = parse_towers(towers, "tune.towers")
    towers = tuple(towers)
    bad = [t for t in towers if t not in masked]
    if bad or not towers or len(set(towers)) != len(towers):
        raise ParamError(f"tune.towers must name distinct towers that have masks ({', '.join(masked)}); "
                         f"got {list(towers)}")
    return tuple(t for t in model.towers if t in towers)  # forward order of the model


# ---------------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------------
@dataclass
class _TowerData:
    calls: list[BlockCall] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    valid: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class _Settings:
    damp: float
    max_scale: float


def tune_masks(teacher: ClipModel, student_masks: Mapping[str, torch.Tensor], loader_or_inputs, *,
               towers=None, damp: float = 1e-2, max_scale: float = 10.0, batch_size: int = 32,
               progress: bool = False, precision: str = "float32") -> tuple[dict[str, torch.Tensor], dict]:
    """Tune the kept units' scales of ``student_masks`` layer by layer against the dense ``teacher``.

    ``loader_or_inputs``: an iterable of ``(images, captions)`` batches (captions as strings or token
    ids), or one ``(images, captions)`` pair split into ``batch_size`` chunks; it is iterated once.
    ``towers``: ``"vision"``, ``"text"``, ``"both"`` or a list; default every tower that has masks.
    ``damp``: ridge strength relative to ``mean(diag G)`` (see the module docstring); ``max_scale``:
    bound on ``|scale|`` beyond which a sub-block keeps its binary mask (with a ``TuningWarning``).

    Returns ``(tuned_masks, report)``: float32 masks with kept entries replaced by their scales (pruned
    entries exactly 0, untuned keys unchanged), and a JSON-serialisable report with one entry per tower,
    layer and kind (``status`` accepted / rejected / skipped, ``error_before`` / ``error_after`` as
    mean squared error per token, ``target_energy`` the per-token error with every kept unit removed,
    ``max_abs_scale``, ``lambda``, ``kept``, ``tokens``, ``reason``).
    ``precision``: ``float32``, or ``bfloat16`` / ``float16`` autocast of the teacher's and student's forward
    passes, with their residual streams kept between blocks in that dtype (half the memory of float32, the
    tuning's largest); the least-squares sums stay float32 / float64 and the solves float64.
    The teacher's weights are not modified.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ParamError(f"tune.precision must be one of {', '.join(AUTOCAST_DTYPES)}; got {precision!r}")
    stream_dtype = AUTOCAST_DTYPES[precision]  # the teacher's and student's streams between blocks, kept in it
    start_time = time.perf_counter()
    validate_masks(teacher, student_masks, "student_masks")
    settings = _Settings(damp=float(damp), max_scale=float(max_scale))  # checked with params.yaml (config)
    tower_names = _tuned_towers(teacher, student_masks, towers)
    device = next(teacher.parameters()).device
    current = {key: mask.detach().to(device=device, dtype=torch.float32).clone()
               for key, mask in student_masks.items()}

    was_training = teacher.module.training
    teacher.module.eval()
    entries: list[dict] = []
    samples = 0
    try:
        with torch.no_grad(), autocast_forward(teacher, precision):
            data = {tower: _TowerData() for tower in tower_names}
            for batch in iter_tower_batches(teacher, loader_or_inputs, tower_names, batch_size):
                for tower, tower_batch in batch.items():
                    hidden, call = capture_block_input(teacher, tower, tower_batch.inputs)
                    data[tower].calls.append(call)
                    data[tower].hidden.append(_stored(hidden, stream_dtype))
                    data[tower].valid.append(tower_batch.valid)
                samples += next(iter(batch.values())).inputs.shape[0] if batch else 0
            ctx = data_parallel_context()
            if ctx.world > 1:  # each process captured its own batches (iter_tower_batches shards them)
                samples = int(ctx.all_reduce_sum(torch.tensor([samples]))[0])
            if samples == 0:
                raise DataError("tune: the calibration data is empty (no batches)")
            total_layers = sum(len(teacher.towers[t].blocks()) for t in tower_names)
            student = prune_model(teacher, current).eval()
            bar = _progress_bar(total_layers, progress)
            try:
                for tower in tower_names:
                    entries += _tune_tower(teacher, student, tower, data.pop(tower), current, settings, bar,
                                           stream_dtype)
            finally:
                bar.close()
    finally:
        teacher.module.train(was_training)

    tuned = {key: current[key].to(device=student_masks[key].device) for key in student_masks}
    report = {
        "damp": settings.damp,
        "max_scale": settings.max_scale,
        "towers": list(tower_names),
        "samples": samples,
        "layers": entries,
        "accepted": sum(e["status"] == "accepted" for e in entries),
        "rejected": sum(e["status"] == "rejected" for e in entries),
        "wall_time_s": round(time.perf_counter() - start_time, 3),
    }
    if precision != "float32":  # float32 runs keep their report byte-identical to before the option existed
        report["precision"] = precision
    return tuned, report


def _progress_bar(total: int, enabled: bool):
    return progress_bar(total=total, desc="tune", unit="layer", enabled=enabled)


def _stored(hidden: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A residual stream as kept between blocks: in ``tune.precision``'s dtype (None: as computed)."""
    return hidden if dtype is None else hidden.to(dtype)


def _tune_tower(teacher: ClipModel, student: ClipModel, tower_name: str, data: _TowerData,
                masks: dict[str, torch.Tensor], settings: _Settings, bar,
                stream_dtype: torch.dtype | None = None) -> list[dict]:
    """Tune one tower's masks in place; ``student`` is ``teacher`` physically pruned by ``masks``.

    The pruned student computes exactly what the masked teacher computes (its ``out_proj`` / second MLP
    linear hold the kept columns times their scales), at the kept fraction of the cost; the input of
    those linears is then directly the raw context / activations of the kept units.
    """
    tower, student_tower = teacher.towers[tower_name], student.towers[tower_name]
    if not isinstance(tower, EncoderTower) or not isinstance(student_tower, EncoderTower):
        raise ParamError(f"tune: tower {tower_name} is not an encoder tower this tuner understands")
    head_key, neuron_key = mask_key(tower_name, "head"), mask_key(tower_name, "neuron")
    teacher_x = data.hidden
    student_x = list(teacher_x)  # identical until the first pruned block
    entries = []
    for layer in range(len(tower.blocks())):
        parts, student_parts = block_parts(tower, layer), block_parts(student_tower, layer)
        where = f"{tower_name} layer {layer}"

        # heads: teacher block (target h_t; y_t kept as next input and MLP target) + student context
        heads = _kept_units(masks, head_key, layer, tower.num_heads(layer) if parts.out_proj is not None else 0)
        head_stats = None
        if heads is not None and heads.numel():
            head_stats = LeastSquaresStats(parts.attention_columns(heads, tower.head_dim), tower.head_dim)
        bias = parts.attention_bias() if head_stats is not None else None
        for b, call in enumerate(data.calls):
            seen: dict[str, torch.Tensor] = {}
            with contextlib.ExitStack() as stack:
                stack.enter_context(record_input(parts.norm2, seen, "h"))
                if b == 0:
                    stack.enter_context(record_structure(parts, seen))
                teacher_out = call.run(parts.block, teacher_x[b])
            if b == 0:
                verify_block_structure(parts, teacher_x[b], seen, teacher_out, where)
            teacher_x[b] = _stored(teacher_out, stream_dtype)
            if head_stats is None:
                continue
            with record_input(student_parts.out_proj, seen, "ctx", stop=True):
                run_until_stop(call, student_parts.block, student_x[b])
            residual = token_rows(seen["h"] - student_x[b], data.valid[b], call.seq_first)
            if bias is not None:
                residual = residual - bias
            head_stats.add(token_rows(seen["ctx"], data.valid[b], call.seq_first), residual)
        entry = _finish(masks, head_key, layer, heads, head_stats, settings, where, "head",
                        skipped_reason=_skip_reason(masks, head_key, parts.out_proj, heads))
        if entry["status"] == "accepted":
            cols = _head_columns(heads, tower.head_dim)
            scales = masks[head_key][layer, heads].repeat_interleave(tower.head_dim)
            with torch.no_grad():
                student_parts.out_proj.weight.copy_(parts.out_proj.weight[:, cols] * scales)
        entries.append(entry)

        # neurons, with the tuned head scales in place; the student's post-attention stream replaces its
        # block input (only the MLP half remains to be run for the next layer)
        neurons = _kept_units(masks, neuron_key, layer, tower.ffn_dim(layer) if parts.fc2 is not None else 0)
        neuron_stats = None
        if neurons is not None and neurons.numel():
            neuron_stats = LeastSquaresStats(parts.mlp_columns(neurons), 1)
        bias = parts.mlp_bias() if neuron_stats is not None else None
        for b, call in enumerate(data.calls):
            seen = {}
            with record_input(student_parts.norm2, seen, "z", stop=neuron_stats is None):
                if neuron_stats is None:
                    run_until_stop(call, student_parts.block, student_x[b])
                else:
                    with record_input(student_parts.fc2, seen, "a", stop=True):
                        run_until_stop(call, student_parts.block, student_x[b])
            student_x[b] = _stored(seen["z"], stream_dtype)
            if neuron_stats is None:
                continue
            residual = token_rows(teacher_x[b] - seen["z"], data.valid[b], call.seq_first)
            if bias is not None:
                residual = residual - bias
            neuron_stats.add(token_rows(seen["a"], data.valid[b], call.seq_first), residual)
        entry = _finish(masks, neuron_key, layer, neurons, neuron_stats, settings, where, "neuron",
                        skipped_reason=_skip_reason(masks, neuron_key, parts.fc2, neurons))
        if entry["status"] == "accepted":
            with torch.no_grad():
                student_parts.fc2.weight.copy_(parts.fc2.weight[:, neurons] * masks[neuron_key][layer, neurons])
        entries.append(entry)

        # propagate the student through the MLP half with this layer's final scales
        for b in range(len(data.calls)):
            student_x[b] = _stored(mlp_branch(student_parts, student_x[b]), stream_dtype)
        bar.update(1)
    return entries


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _kept_units(masks: Mapping[str, torch.Tensor], key: str, layer: int, width: int) -> torch.Tensor | None:
    if key not in masks:
        return None
    return torch.nonzero(masks[key][layer, :width] != 0).flatten()


def _skip_reason(masks, key, module, kept) -> str | None:
    if key not in masks:
        return "no mask"
    if module is None:
        return "sub-block dropped"
    if kept is None or kept.numel() == 0:
        return "no kept units"
    return None


def _finish(masks: dict[str, torch.Tensor], key: str, layer: int, kept: torch.Tensor | None,
            stats: LeastSquaresStats | None, settings: _Settings, where: str, kind: str,
            skipped_reason: str | None) -> dict:
    """Solve one sub-block, write accepted scales into ``masks``, and describe the outcome."""
    tower, _ = parse_mask_key(key)
    entry = {"tower": tower, "layer": layer, "kind": kind, "kept": 0 if kept is None else int(kept.numel())}
    if stats is None:
        return {**entry, "status": "skipped", "reason": skipped_reason or "no data", "error_before": None,
                "error_after": None, "target_energy": None, "max_abs_scale": None, "lambda": None, "tokens": 0}
    stats.reduce()
    G, r = stats.system()
    start = masks[key][layer, kept].double()
    solution = solve_scales(G, r, start, settings.damp, lambda s: stats.error(G, r, s))
    finite = bool(torch.isfinite(solution.scales).all())
    max_abs = float(solution.scales.abs().max()) if finite else float("inf")
    reason = None
    if not finite:
        reason = "non-finite scales (singular normal equations)"
    elif max_abs > settings.max_scale:
        reason = f"scales outside [-{settings.max_scale:g}, {settings.max_scale:g}] (max |s| = {max_abs:.3g})"
    elif not solution.error_before - solution.error_after > NOISE_FLOOR * stats.target_sq:
        reason = "no improvement"  # gains below the rounding noise of the statistics are not gains
    if reason is None:
        masks[key][layer, kept] = solution.scales.to(masks[key].dtype)
    elif reason != "no improvement":
        warnings.warn(f"tune: {where} {kind}s: {reason}; keeping the binary mask for this sub-block",
                      TuningWarning, stacklevel=4)
    tokens = max(stats.tokens, 1)
    error_after = solution.error_before if reason is not None else solution.error_after
    return {
        **entry,
        "status": "accepted" if reason is None else "rejected",
        "reason": reason,
        "error_before": max(solution.error_before, 0.0) / tokens,
        "error_after": max(error_after, 0.0) / tokens,
        "target_energy": stats.target_sq / tokens,  # error of dropping every kept unit: a scale for the errors
        "max_abs_scale": max_abs if finite else None,
        "lambda": solution.damping,
        "tokens": stats.tokens,
    }
