"""The registry of importance criteria, looked up by ``score.criterion``, and the result they return.

A criterion is ``fn(model, loader, *, towers, loss, granularity, progress, **options) -> ScoreResult``:

* ``model``: a ``ClipModel``; ``loader``: an iterable of ``(images, captions)`` batches (captions as a list
  of strings or already-tokenized ids), ignored by data-free criteria;
* ``towers``: tuple of tower names to score (``"both"``, ``"vision"``, ``"text"`` are accepted and
  normalised here); ``loss``: a loss name (``losses.get_loss``); ``granularity``: ``"batch"`` | ``"sample"``;
* ``options``: criterion-specific keywords (``score.options``); unknown ones raise a one-line ParamError.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from clipprune import config
from clipprune.config import GRANULARITIES
from clipprune.errors import ParamError
from clipprune.registry import Registry

GRADS_SUFFIX = ".grads"


@dataclass
class ScoreResult:
    """What a criterion returns.

    ``scores``: ``"<tower>.head"`` -> float32 ``[layers, heads]``, ``"<tower>.neuron"`` -> ``[layers, ffn_dim]``
    (higher = more important). ``grads``: ``"<tower>.head.grads"`` -> ``[rows, layers, heads]`` etc., the mask
    gradient of each batch (granularity batch) or sample (granularity sample), in data order; empty for
    data-free criteria. ``meta``: JSON-serialisable facts (criterion, loss, samples, batches, wall time...).
    """

    scores: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Scores and grads in one flat dict (the layout of scores.safetensors)."""
        return {**self.scores, **self.grads}


CriterionFn = Callable[..., ScoreResult]

CRITERIA = Registry("score.criterion", "criterion",
                    fixed=("model", "loader", "towers", "loss", "granularity", "progress"))


def parse_towers(towers) -> tuple[str, ...]:
    """``"vision"`` | ``"text"`` | ``"both"`` (or a sequence of tower names) -> tuple of tower names."""
    if not isinstance(towers, str) and isinstance(towers, Iterable):
        names = tuple(towers)
        if names and len(set(names)) == len(names) and all(t in ("vision", "text") for t in names):
            return tuple(t for t in ("vision", "text") if t in names)
    return config.parse_towers(towers, "score.towers")


def check_granularity(granularity) -> str:
    return config.check_choice(granularity, GRANULARITIES, "score.granularity")


def _checked(fn: CriterionFn, name: str, known: tuple[str, ...], takes_any: bool) -> CriterionFn:
    """The registered criterion: normalises ``towers``, checks ``granularity``, the loss name and the options,
    validates the result and adds ``criterion``, ``towers``, ``granularity`` and ``wall_time_s`` to its meta."""

    @functools.wraps(fn)
    def criterion(model, loader=None, *, towers="both", loss="contrastive", granularity="batch",
                  progress=False, **options) -> ScoreResult:
        from .losses import LOSSES

        CRITERIA.check_options(name, options, known, takes_any)
        towers = parse_towers(towers)
        granularity = check_granularity(granularity)
        if loss is not None:
            LOSSES.get(loss)
        start = time.perf_counter()
        result = fn(model, loader, towers=towers, loss=loss, granularity=granularity, progress=progress,
                    **options)
        _check_result(name, result, towers)
        result.meta = {**result.meta, "criterion": name, "towers": list(towers), "granularity": granularity,
                       "wall_time_s": round(time.perf_counter() - start, 4)}
        return result

    return criterion


def register_criterion(name: str, needs_data: bool = True) -> Callable[[CriterionFn], CriterionFn]:
    """Decorator: register a criterion under ``name`` (a value of ``score.criterion``).

    ``needs_data=False`` marks criteria that ignore the loader (callers may pass ``None``).
    The registered callable normalises ``towers``, checks ``granularity`` and the loss name, rejects
    unknown options with a one-line ParamError, and adds ``criterion`` and ``wall_time_s`` to the meta.
    """
    return CRITERIA.register(name, _checked, needs_data=needs_data)


def _check_result(name: str, result: ScoreResult, towers: tuple[str, ...]) -> None:
    """A criterion must return float32 finite scores for exactly the scored towers (a bug otherwise)."""
    if not isinstance(result, ScoreResult):
        raise TypeError(f"criterion {name!r} returned {type(result).__name__}, expected ScoreResult")
    expected = {f"{t}.{k}" for t in towers for k in ("head", "neuron")}
    if set(result.scores) != expected:
        raise RuntimeError(f"criterion {name!r} returned score keys {sorted(result.scores)}, "
                           f"expected {sorted(expected)}")
    for key, value in result.scores.items():
        if value.dtype != torch.float32 or value.dim() != 2:
            raise RuntimeError(f"criterion {name!r}: {key} must be a float32 [layers, units] tensor")
    for key in result.grads:
        if not key.endswith(GRADS_SUFFIX) or key[:-len(GRADS_SUFFIX)] not in expected:
            raise RuntimeError(f"criterion {name!r} returned a malformed grads key {key!r}")
    if not all(bool(torch.isfinite(v).all()) for v in result.scores.values()):
        raise RuntimeError(f"criterion {name!r} returned non-finite scores")


def available_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return CRITERIA.names()


def get_criterion(name: str) -> CriterionFn:
    """The criterion registered as ``name``; ParamError naming ``score.criterion`` otherwise."""
    return CRITERIA.get(name)
