"""The registry of weight-sparsity methods, looked up by ``sparsity.method``.

A method is ``fn(layers, config, data, progress) -> SparsityResult``:

* ``layers``: ordered ``{name: nn.Linear}`` (``layers.prunable_linears``), weights read, never modified;
* ``config``: the validated ``SparsityConfig``;
* ``data``: what the method reads from the calibration set, by its registered ``source``: a
  ``GradientSource`` of per-sample gradients (``source="gradients"``: cap, fastcap; the argument is named
  ``grads``), an ``inputs.InputSource`` of layer inputs (``source="inputs"``: wanda, sparsegpt; named
  ``inputs``), or ``None`` for data-free methods (``needs_data=False``: magnitude).

It returns, for every target in ``config.targets``, the new dense-shaped weight of every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from clipprune.registry import Registry


@dataclass
class SparsityResult:
    """``weights[target][layer name]``: float32 weight tensors with zeros; ``meta``: JSON-able facts."""

    weights: dict[float, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)


@dataclass
class GradientSource:
    """Streams per-sample gradients of a subset of layers: ``stream(names)`` makes one calibration pass.

    ``num_grads``: rows each pass yields in all (already capped by the calibration size); ``passes``
    counts the calibration passes made (CAP with ``chunk_layers`` makes several).
    """

    stream_fn: Callable[[list[str]], Iterator[dict[str, torch.Tensor]]]
    num_grads: int
    passes: int = 0

    def stream(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        self.passes += 1
        return self.stream_fn(list(names))


METHODS = Registry("sparsity.method", "method", fixed=("layers", "config", "grads", "inputs", "progress"))
SOURCES = ("gradients", "inputs")


def register_method(name: str, needs_data: bool = True, source: str = "gradients"):
    """Decorator: register a sparsity method under ``name`` (a value of ``sparsity.method``).

    ``needs_data=False`` marks methods that read no calibration data (they get ``None``); ``source`` says
    what a data method reads: per-sample ``gradients`` or layer ``inputs``.
    """
    if source not in SOURCES:
        raise ValueError(f"a sparsity method's source must be one of {', '.join(SOURCES)}, got {source!r}")
    return METHODS.register(name, needs_data=needs_data, source=source)


def available_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> Callable:
    return METHODS.get(name)
