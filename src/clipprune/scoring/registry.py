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
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from clipprune.config import GRANULARITIES, TOWER_CHOICES
from clipprune.errors import ParamError

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

_CRITERIA: dict[str, CriterionFn] = {}
_FIXED_ARGS = ("model", "loader", "towers", "loss", "granularity", "progress")


def parse_towers(towers) -> tuple[str, ...]:
    """``"vision"`` | ``"text"`` | ``"both"`` (or a sequence of tower names) -> tuple of tower names."""
    if isinstance(towers, str):
        if towers not in TOWER_CHOICES:
            raise ParamError(f"score.towers must be one of {', '.join(TOWER_CHOICES)}; got {towers!r}")
        return TOWER_CHOICES[towers]
    if isinstance(towers, Iterable):
        names = tuple(towers)
        if names and len(set(names)) == len(names) and all(t in ("vision", "text") for t in names):
            return tuple(t for t in ("vision", "text") if t in names)
    raise ParamError(f"score.towers must be one of {', '.join(TOWER_CHOICES)}; got {towers!r}")


def check_granularity(granularity) -> str:
    if granularity not in GRANULARITIES:
        raise ParamError(f"score.granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    return granularity


def _option_names(fn: Callable) -> tuple[list[str], bool]:
    params = inspect.signature(fn).parameters
    names = [p.name for p in params.values()
             if p.name not in _FIXED_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def register_criterion(name: str, needs_data: bool = True) -> Callable[[CriterionFn], CriterionFn]:
    """Decorator: register a criterion under ``name`` (a value of ``score.criterion``).

    ``needs_data=False`` marks criteria that ignore the loader (callers may pass ``None``).
    The registered callable normalises ``towers``, checks ``granularity`` and the loss name, rejects
    unknown options with a one-line ParamError, and adds ``criterion`` and ``wall_time_s`` to the meta.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"criterion name must be a non-empty string, got {name!r}")

    def decorate(fn: CriterionFn) -> CriterionFn:
        known, takes_any = _option_names(fn)

        @functools.wraps(fn)
        def criterion(model, loader=None, *, towers="both", loss="contrastive", granularity="batch",
                      progress=False, **options) -> ScoreResult:
            from .losses import get_loss

            unknown = sorted(set(options) - set(known))
            if unknown and not takes_any:
                raise ParamError(f"score.options: unknown option(s) {', '.join(unknown)} for criterion {name!r}; "
                                 f"known: {', '.join(known) or 'none'}")
            towers = parse_towers(towers)
            granularity = check_granularity(granularity)
            if loss is not None:
                get_loss(loss)
            start = time.perf_counter()
            result = fn(model, loader, towers=towers, loss=loss, granularity=granularity, progress=progress,
                        **options)
            _check_result(name, result, towers)
            result.meta = {**result.meta, "criterion": name, "towers": list(towers), "granularity": granularity,
                           "wall_time_s": round(time.perf_counter() - start, 4)}
            return result

        previous = _CRITERIA.get(name)
        if previous is not None and (previous.__module__, previous.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"a criterion named {name!r} is already registered "
                             f"({previous.__module__}.{previous.__qualname__})")
        criterion.criterion_name = name
        criterion.needs_data = needs_data
        criterion.options = tuple(known)
        _CRITERIA[name] = criterion
        return criterion

    return decorate


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


def _load_builtin() -> None:
    # importing the package registers the built-in criteria (fisher, magnitude)
    import clipprune.scoring  # noqa: F401


def available_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    _load_builtin()
    return sorted(_CRITERIA)


def get_criterion(name: str) -> CriterionFn:
    """The criterion registered as ``name``; ParamError naming ``score.criterion`` otherwise."""
    _load_builtin()
    if not isinstance(name, str) or name not in _CRITERIA:
        raise ParamError(f"score.criterion must be one of {', '.join(sorted(_CRITERIA))}; got {name!r}")
    return _CRITERIA[name]
