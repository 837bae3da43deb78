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

SearchFn = Callable[..., dict]  # (scores, views, constraint, metric="mac", **options) -> masks

_SEARCHES: dict[str, SearchFn] = {}
_CONTEXT_ARGS = ("model", "holdout", "report")  # supplied by the caller, never by search.options
_FIXED_ARGS = ("scores", "views", "constraint", "metric") + _CONTEXT_ARGS


def _option_names(fn: Callable) -> tuple[list[str], bool]:
    """Keyword options a search accepts beyond the fixed arguments (and whether it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    names = [p.name for p in params.values()
             if p.name not in _FIXED_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def register_search(name: str, needs_model: bool = False) -> Callable[[SearchFn], SearchFn]:
    """Decorator: register a search under ``name`` (the value of ``search.method``).

    The registered callable rejects unknown options with a one-line ParamError instead of a TypeError.
    ``needs_model=True``: the search requires ``model=`` and ``holdout=`` (ParamError without them).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"search name must be a non-empty string, got {name!r}")

    def decorate(fn: SearchFn) -> SearchFn:
        known, takes_any = _option_names(fn)
        accepted = set(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def search(scores, views, constraint, metric="mac", *, model=None, holdout=None, report=None, **options):
            unknown = sorted(set(options) - set(known))
            if unknown and not takes_any:
                raise ParamError(f"search.options: unknown option(s) {', '.join(unknown)} for method {name!r}; "
                                 f"known: {', '.join(known) or 'none'}")
            if needs_model and (model is None or holdout is None):
                raise ParamError(f"search.method={name} measures the model: it needs the model and held-out "
                                 f"data (model=, holdout=)")
            context = {k: v for k, v in (("model", model), ("holdout", holdout), ("report", report))
                       if k in accepted}
            return fn(scores, views, constraint, metric, **context, **options)

        previous = _SEARCHES.get(name)
        if previous is not None and (previous.__module__, previous.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"a search named {name!r} is already registered ({previous.__module__}.{previous.__qualname__})")
        search.search_name = name
        search.needs_model = needs_model
        search.options = tuple(known)
        _SEARCHES[name] = search
        return search

    return decorate


def _load_builtin() -> None:
    # importing the package registers the built-in searches (mac, uniform)
    import clipprune.search  # noqa: F401


def available_searches() -> list[str]:
    """Names of the registered searches, sorted."""
    _load_builtin()
    return sorted(_SEARCHES)


def get_search(name: str) -> SearchFn:
    """The search registered as ``name``; ParamError naming ``search.method`` otherwise."""
    _load_builtin()
    if not isinstance(name, str) or name not in _SEARCHES:
        raise ParamError(f"search.method must be one of {', '.join(sorted(_SEARCHES))}; got {name!r}")
    return _SEARCHES[name]
