"""Reduced-precision forward passes (``score.precision``, ``tune.precision``): torch autocast around a model's
forward passes, with the statistics that must stay exact (Fisher sums, least-squares systems) kept in float32 /
float64 by their owners."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .base import ClipModel

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def autocast_forward(model: ClipModel, precision: str) -> Iterator[None]:
    """Inside: the model's forward passes in ``precision`` (torch autocast on its device); ``float32``: as is."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(next(model.parameters()).device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Inside: no autocast on ``device`` (for sums that an enclosing ``autocast_forward`` must not round)."""
    with torch.autocast(device.type, enabled=False):
        yield
