"""The registry of mask searches, looked up by ``search.method``.

A search is ``fn(scores, views, constraint, metric="mac", **options) -> masks``: ``scores`` maps
``"<tower>.head"`` / ``"<tower>.neuron"`` to score tensors, ``views`` maps tower names to their BlockView
lists, and the result holds binary float32 masks with the same keys and shapes as the scores, whose kept
cost never exceeds ``constraint`` × the prunable cost of the searched towers.

Searches registered with ``needs_model=True`` (``adaptive``) also measure the model: the caller passes
``model=`` (a ``ClipModel``) and ``holdout=`` (an iterable of ``(images, captions)`` batches held out from
calibration). Any search may take ``report=`` (a dict it fills with JSON-ready diagnostics). These context
arguments are not options: ``search.options`` cannot set them.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from clipprune.errors import ParamError
from clipprune.registry import Registry

SearchFn = Callable[..., dict]  # (scores, views, constraint, metric="mac", **options) -> masks

_CONTEXT_ARGS = ("model", "holdout", "report")  # supplied by the caller, never by search.options
SEARCHES = Registry("search.method", "method",
                    fixed=("scores", "views", "constraint", "metric") + _CONTEXT_ARGS)


def _checked(fn: SearchFn, name: str, known: tuple[str, ...], takes_any: bool, needs_model: bool) -> SearchFn:
    """The registered search: unknown options and a missing model are one-line ParamErrors."""
    accepted = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def search(scores, views, constraint, metric="mac", *, model=None, holdout=None, report=None, **options):
        SEARCHES.check_options(name, options, known, takes_any)
        if needs_model and (model is None or holdout is None):
            raise ParamError(f"search.method={name} measures the model: it needs the model and held-out "
                             f"data (model=, holdout=)")
        context = {k: v for k, v in (("model", model), ("holdout", holdout), ("report", report))
                   if k in accepted}
        return fn(scores, views, constraint, metric, **context, **options)

    return search


def register_search(name: str, needs_model: bool = False) -> Callable[[SearchFn], SearchFn]:
    """Decorator: register a search under ``name`` (the value of ``search.method``).

    The registered callable rejects unknown options with a one-line ParamError instead of a TypeError.
    ``needs_model=True``: the search requires ``model=`` and ``holdout=`` (ParamError without them).
    """
    return SEARCHES.register(name, functools.partial(_checked, needs_model=needs_model), needs_model=needs_model)


def available_searches() -> list[str]:
    """Names of the registered searches, sorted."""
    return SEARCHES.names()


def get_search(name: str) -> SearchFn:
    """The search registered as ``name``; ParamError naming ``search.method`` otherwise."""
    return SEARCHES.get(name)
