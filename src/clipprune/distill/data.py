"""Training images for distillation: a seeded subset of the train split and a per-epoch batch plan.

Data order depends only on ``(seed, epoch)``, never on how far a previous run got, so a run resumed
from the checkpoint of epoch k sees exactly the batches an uninterrupted run sees. A global batch is
cut into ``world`` equal contiguous shards, one per process (rank ``r`` takes shard ``r``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.coco import CocoCaptions
from ..errors import ParamError

_SUBSET_STREAM = 1  # numpy SeedSequence entropy words: one stream for the subset, one per epoch
_EPOCH_STREAM = 2


def select_images(image_ids: Sequence[int], num_samples: int | None, seed: int, share: float = 1.0) -> list[int]:
    """``num_samples`` image ids (all when None) drawn with ``seed``, then the first ``share`` of them.

    The draw is a fixed seeded permutation, so a smaller share is a prefix of a larger one.
    """
    ids = sorted(int(i) for i in image_ids)
    if num_samples is not None and num_samples > len(ids):
        raise ParamError(f"distill.num_samples must be <= {len(ids)} (images in the train split), got {num_samples}")
    order = np.random.default_rng([seed, _SUBSET_STREAM]).permutation(len(ids))
    pool = [ids[int(i)] for i in order[: num_samples if num_samples is not None else len(ids)]]
    count = max(1, int(round(share * len(pool))))
    return pool[:count]


@dataclass(frozen=True)
class EpochPlan:
    """The global batches of one epoch: ``batches[s]`` holds dataset positions, ``caption_picks[s]`` a
    number in [0, 1) per item that picks one of the image's captions."""

    batches: list[np.ndarray]
    caption_picks: list[np.ndarray]


def epoch_plan(num_items: int, batch_size: int, seed: int, epoch: int) -> EpochPlan:
    """Shuffled full global batches for ``epoch`` (the last partial batch is dropped)."""
    if batch_size > num_items:
        raise ParamError(f"distill.batch_size must be <= the {num_items} training images, got {batch_size}")
    rng = np.random.default_rng([seed, _EPOCH_STREAM, epoch])
    order = rng.permutation(num_items)
    picks = rng.random(num_items)
    steps = num_items // batch_size
    return EpochPlan(
        batches=[order[s * batch_size:(s + 1) * batch_size] for s in range(steps)],
        caption_picks=[picks[s * batch_size:(s + 1) * batch_size] for s in range(steps)],
    )


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return num_items // batch_size


def shard(items: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous, equal share of a global batch."""
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


class TrainImages:
    """Selected images of the train split (see ``select_images``) and their captions."""

    def __init__(self, images_dir: str | os.PathLike, captions_file: str | os.PathLike, preprocess: Callable,
                 num_samples: int | None, seed: int, share: float = 1.0):
        self.dataset = CocoCaptions(images_dir, captions_file, transform=preprocess)
        self.image_ids = select_images(self.dataset.image_ids, num_samples, seed, share)

    def __len__(self) -> int:
        return len(self.image_ids)

    def batch(self, positions: np.ndarray, picks: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        """Stacked image tensors and one caption per image (chosen by ``picks``)."""
        images, captions = [], []
        for position, pick in zip(positions, picks):
            image_id = self.image_ids[int(position)]
            images.append(self.dataset._transformed(image_id))
            texts = self.dataset.captions(image_id)
            captions.append(texts[min(int(pick * len(texts)), len(texts) - 1)] if texts else "")
        return torch.stack(images), captions
