"""``load_model(name)``: resolve a model name to a ``ClipModel``, and what every family's loader shares.

Names: ``fixture:<name>`` (``<CLIPPRUNE_FIXTURES>/<name>/``, the embedded default), ``open_clip:<arch>/<pretrained
tag or local file>``, ``hf:<repo id or local dir>``, ``pruned:<dir>`` (a directory written by
``models.pruned.export_pruned``). The part before the colon picks a loader from ``MODEL_SOURCES``; each family's
adapter module registers its own (``open_clip_adapter``: ``fixture``, ``open_clip``; ``hf_adapter``: ``hf``;
``pruned``: ``pruned``). Weights are looked up in local caches first; a name that cannot be loaded fails with a
one-line ModelLoadError saying how to make the weights available. ``resolve_model_files(name)`` (from
``clipprune.model_files``) says which local files or folders a name reads, without loading them.

The helpers below are the loaders' common ground: one-line error text, refusing pickles, quiet logs, reading a
safetensors state dict for a module, and ``AssumedDefaultsWarning`` for an optional file a folder lacks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle  # only for its exception type: nothing is unpickled
import re
import warnings
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..io import FLOATING, read_safetensors
from ..model_files import check_model_files, fixtures_root, resolve_model_files, split_name
from .base import MODEL_SOURCES, ClipModel

__all__ = ["MODEL_SOURCES", "AssumedDefaultsWarning", "check_model_files", "fixtures_root", "load_model",
           "resolve_model_files"]


class AssumedDefaultsWarning(UserWarning):
    """A model folder lacks an optional file; the documented default stands in for it (logged once)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
UNSAFE_CHECKPOINT = ("holds pickled Python objects, which are never unpickled here (torch.load weights_only=True "
                     "refused it); convert it to safetensors on a machine where its source is trusted")


def first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()  # torch's messages carry terminal bold codes
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def refused_pickle(err: BaseException) -> bool:
    """True if ``err`` (or an exception it wraps) is torch's weights-only loader refusing a pickle."""
    while err is not None:
        if isinstance(err, pickle.UnpicklingError):
            return True
        err = err.__cause__ or err.__context__
    return False


def read_model_state(path: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load a state dict for ``module``, floating tensors cast to float32 (fixtures may be stored in float16).

    A tensor for a floating parameter or buffer must be floating (``load_state_dict`` would cast integers
    silently); names the module lacks (a state dict of the adapted model) must be floating too.
    """
    dtypes = {key: FLOATING if value.is_floating_point() else value.dtype
              for key, value in module.state_dict().items()}
    state, _ = read_safetensors(path, error=ModelLoadError, dtypes={**dtypes, "*": FLOATING})
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def quiet_root_logger():
    """Drop ERROR records logged on the root logger while the block runs (warnings still show).

    open_clip reports a failed weight download with logging.error() before raising; the caller turns the
    exception into one ModelLoadError line, so the log record would only print the same failure twice.
    """
    logging.root.addFilter(_below_error)
    try:
        yield
    finally:
        logging.root.removeFilter(_below_error)


def warn_assumed(message: str) -> None:
    warnings.warn(message, AssumedDefaultsWarning, stacklevel=3)  # once per message (Python's default filter)


def read_json_file(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable {what} ({first_line(err)})") from err


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_model(name: str, device: str | torch.device = "cpu") -> ClipModel:
    """Load a CLIP model by name (see module docstring) in eval mode, float32, on ``device``."""
    prefix, spec = split_name(name)
    return MODEL_SOURCES.get(prefix)(spec, str(device))
