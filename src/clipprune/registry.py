"""One registry for the library's pluggable pieces: criteria, losses, searches and sparsity methods.

In the spirit of timm's model registry: a module defines a function and registers it under a name with
``@REGISTRY.register("name")``; a stage looks it up with ``REGISTRY.get(params value)``. Each registry knows
the params key that holds the name (``search.method``) and the one that holds its options
(``search.options``), so every lookup or option error is one line naming that key::

    search.method must be one of adaptive, mac, param_sum, threshold, uniform; got 'kwon'
    search.options: unknown option(s) beta for method 'mac'; known: normalize

A function's *options* are its keyword arguments other than the ``fixed`` ones the caller always passes;
``available()`` lists every name with its options (for messages, ``clipprune.config``'s tables and the
README). Registering a second function under a taken name is an error.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable, Mapping

from clipprune.errors import ParamError


class Registry:
    """Named functions of one kind.

    ``key``: the params key holding the name; ``kind``: what an entry is called in messages ("criterion",
    "method", "loss"); ``fixed``: the arguments every caller supplies (not options); ``options_key``: the params
    key of the options (default ``<section>.options``).

    A registry lives in a package whose ``__init__`` imports the modules that register the built-in entries;
    importing the registry's module runs that ``__init__`` first, so whoever looks up finds them all.
    """

    def __init__(self, key: str, kind: str, *, fixed: Iterable[str] = (), options_key: str | None = None):
        self.key, self.kind, self.fixed = key, kind, tuple(fixed)
        self.options_key = options_key or f"{key.split('.')[0]}.options"
        self._entries: dict[str, Callable] = {}

    # ------------------------------------------------------------------ registering
    def option_names(self, fn: Callable) -> tuple[tuple[str, ...], bool]:
        """The keyword options ``fn`` accepts beyond the fixed arguments, and whether it takes ``**kwargs``."""
        params = inspect.signature(fn).parameters.values()
        names = tuple(p.name for p in params
                      if p.name not in self.fixed and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        return names, any(p.kind == p.VAR_KEYWORD for p in params)

    def register(self, name: str, wrap: Callable | None = None, **attributes) -> Callable[[Callable], Callable]:
        """Decorator: register a function under ``name``; returns what is registered.

        ``wrap(fn, name, options, takes_any)``, if given, builds the registered callable around ``fn`` (the
        argument checks of its kind). The entry gets ``registered_name``, ``options`` and ``attributes``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def decorate(fn: Callable) -> Callable:
            options, takes_any = self.option_names(fn)
            entry = wrap(fn, name, options, takes_any) if wrap is not None else fn
            previous = self._entries.get(name)
            origin = getattr(previous, "__wrapped__", previous)
            # the same function registered again (a module reloaded) replaces itself; another one is refused
            if previous is not None and (origin.__module__, origin.__qualname__) != (fn.__module__, fn.__qualname__):
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"({origin.__module__}.{origin.__qualname__})")
            entry.registered_name = name
            entry.options = options
            for attribute, value in attributes.items():
                setattr(entry, attribute, value)
            self._entries[name] = entry
            return entry

        return decorate

    # ------------------------------------------------------------------ looking up
    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def available(self) -> dict[str, tuple[str, ...]]:
        """Every registered name (sorted) with its options."""
        return {name: self._entries[name].options for name in self.names()}

    def get(self, name, key: str | None = None) -> Callable:
        """The entry registered as ``name``; a one-line ParamError naming the params key otherwise (``key``:
        another params key that holds a name of this registry, e.g. ``sparsity.loss`` for a loss)."""
        names = self.names()
        if not isinstance(name, str) or name not in self._entries:
            raise ParamError(f"{key or self.key} must be one of {', '.join(names)}; got {name!r}")
        return self._entries[name]

    def check_options(self, name: str, options: Mapping, known: Iterable[str] | None = None,
                      takes_any: bool = False) -> None:
        """ParamError for options the entry ``name`` does not take (``known``: its options by default)."""
        known = self.get(name).options if known is None else tuple(known)
        unknown = sorted(set(options) - set(known))
        if unknown and not takes_any:
            raise ParamError(f"{self.options_key}: unknown option(s) {', '.join(unknown)} for {self.kind} {name!r}; "
                             f"known: {', '.join(known) or 'none'}")
