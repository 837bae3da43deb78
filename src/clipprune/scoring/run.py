"""Running a criterion on calibration pairs, and the scores file (``artifacts/scores/scores.safetensors``).

File layout: tensors ``"<tower>.head"`` / ``"<tower>.neuron"`` (scores, float32) and ``"<key>.grads"``
(gradient rows, ``[rows, layers, units]``); metadata values are JSON-encoded (``ScoreResult.meta`` plus what
the caller adds: model name, seed, calibration file...).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from clipprune.data.calibration import read_calibration
from clipprune.data.coco import CocoCaptions, collate_image_caption_pairs
from clipprune.errors import ClipPruneError, ParamError
from clipprune.io import read_safetensors, save_safetensors
from clipprune.models.base import ClipModel
from clipprune.models.precision import AUTOCAST_DTYPES, autocast_forward

from .losses import get_loss
from .registry import GRADS_SUFFIX, ScoreResult, get_criterion


def calibration_loader(images_dir: str | os.PathLike, captions_file: str | os.PathLike,
                       calibration_file: str | os.PathLike, preprocess: Callable, batch_size: int) -> DataLoader:
    """Deterministic loader of (image tensor batch, list of captions) over the pairs of a calibration file."""
    dataset = CocoCaptions(images_dir, captions_file, transform=preprocess)
    pairs, _ = read_calibration(calibration_file, dataset)
    # shuffle off, no workers: batches (and so per-batch Fisher rows) are the same on every run
    return DataLoader(dataset.pair_dataset(pairs), batch_size=batch_size, shuffle=False, num_workers=0,
                      collate_fn=collate_image_caption_pairs)


def _check_batches(loader, loss: str) -> None:
    """Fail before any work if a batch would be too small for the loss (e.g. a last batch of 1)."""
    min_batch = get_loss(loss).min_batch
    size, total = getattr(loader, "batch_size", None), None
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):
        return
    if not size or min_batch <= 1:
        return
    smallest = min(size, total) if total % size == 0 else total % size
    if smallest < min_batch:
        raise ParamError(f"score.batch_size={size} leaves a batch of {smallest} of the {total} calibration "
                         f"samples, but score.loss={loss} needs at least {min_batch} per batch; change "
                         f"score.batch_size or calibrate.num_samples")


@contextlib.contextmanager
def checkpointed_blocks(model: ClipModel) -> Iterator[None]:
    """Inside: every block of every tower runs under ``torch.utils.checkpoint`` (non-reentrant).

    A block's activations are not kept for the backward but recomputed from its input (hooks included, so the
    masks act the same), trading one more forward for memory: the gradients are the same. The blocks'
    ``forward`` are restored on exit.
    """
    from torch.utils.checkpoint import checkpoint

    patched = []
    try:
        for tower in model.towers.values():
            for block in tower.blocks():
                original = block.forward

                def forward(*args, _original=original, **kwargs):
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)

                block.forward = forward
                patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # the instance attribute: the class's forward again


def score_model(model: ClipModel, loader, *, criterion: str, loss: str | None = "contrastive",
                granularity: str = "batch", towers="both", seed: int = 0, progress: bool = True,
                options: Mapping | None = None, precision: str = "float32",
                checkpointing: bool = False) -> ScoreResult:
    """Seed torch, run the criterion registered as ``criterion`` and return its ``ScoreResult``.

    ``precision``: float32, or bfloat16 / float16 autocast of the forward passes; ``checkpointing``: recompute
    each block in the backward instead of keeping its activations (``checkpointed_blocks``). Under an active
    ``clipprune.distributed.data_parallel`` context the gradient criteria shard the batches over the processes.
    """
    # the masks stay float32 leaves under autocast: their gradients (and the Fisher sums, float64) stay float32
    if precision not in AUTOCAST_DTYPES:
        raise ParamError(f"score.precision must be one of {', '.join(AUTOCAST_DTYPES)}; got {precision!r}")
    fn = get_criterion(criterion)  # the registered criterion checks towers, granularity, loss and options
    if fn.needs_data:
        if loss is None:
            raise ParamError(f"score.loss is required by criterion {criterion!r}")
        if loader is None:
            raise ParamError(f"score.criterion={criterion} needs calibration data")
        _check_batches(loader, loss)
    torch.manual_seed(seed)
    with autocast_forward(model, precision), \
            (checkpointed_blocks(model) if checkpointing else contextlib.nullcontext()):
        result = fn(model, loader if fn.needs_data else None, towers=towers,
                    loss=loss if fn.needs_data else None, granularity=granularity, progress=progress,
                    **dict(options or {}))
    result.meta = {**result.meta, "seed": seed}
    if precision != "float32":  # float32 runs keep their artifact byte-identical to before the option existed
        result.meta["precision"] = precision
    return result


def save_scores(path: str | os.PathLike, result: ScoreResult, metadata: Mapping | None = None) -> Path:
    """Write scores, gradient rows and metadata (``result.meta`` updated by ``metadata``) atomically."""
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in result.tensors().items()}
    meta = {**result.meta, **dict(metadata or {})}
    encoded = {str(k): json.dumps(v, sort_keys=True) for k, v in meta.items()}
    path = Path(path)
    save_safetensors(path, tensors, encoded)
    return path


def load_scores(path: str | os.PathLike) -> ScoreResult:
    """Read a file written by ``save_scores`` (ClipPruneError naming the file if it is missing or corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"{path}: scores file not found (run the score stage)")
    # save_scores writes float32 only: integer scores would be ranked (and ties broken) differently
    tensors, raw_meta = read_safetensors(path, error=ClipPruneError,
                                         unreadable="not a readable safetensors scores file",
                                         dtypes={"*": torch.float32})
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    grads = {k: v for k, v in tensors.items() if k.endswith(GRADS_SUFFIX)}
    scores = {k: v for k, v in tensors.items() if not k.endswith(GRADS_SUFFIX)}
    return ScoreResult(scores=scores, grads=grads, meta=meta)
