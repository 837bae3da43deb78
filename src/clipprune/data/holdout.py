"""The held-out split of the train data: pairs whose images calibration did not use (AMP's adaptive search)."""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

import numpy as np
from torch.utils.data import DataLoader

from ..errors import ParamError
from .calibration import read_calibration
from .coco import CocoCaptions, collate_image_caption_pairs

HOLDOUT_STREAM = 0xADA  # second seed word: the holdout draw is independent of the calibration draw


def holdout_pairs(dataset: CocoCaptions, exclude: Iterable[Mapping], num_samples: int, seed: int) -> list[dict]:
    """``num_samples`` (image, caption) pairs of images that no pair in ``exclude`` uses, one per image.

    Disjoint *images* (not just pairs): the entropy loss reads images only, so a calibration image with
    another caption would not be held out. Deterministic for ``seed``, own numpy Generator.
    """
    used = {int(p["image_id"]) for p in exclude}
    free = sorted(i for i in dataset.image_ids if i not in used and dataset.annotation_ids(i))
    if num_samples > len(free):
        raise ParamError(f"search.holdout_samples must be <= {len(free)} (images of {dataset.annotation_file} "
                         f"not used for calibration), got {num_samples}")
    rng = np.random.default_rng([int(seed), HOLDOUT_STREAM])
    pairs = []
    for position in rng.choice(len(free), size=num_samples, replace=False):
        image_id = free[int(position)]
        annotations = sorted(dataset.annotation_ids(image_id))
        pairs.append({"image_id": int(image_id), "annotation_id": int(annotations[int(rng.integers(len(annotations)))])})
    return pairs


def holdout_loader(images_dir: str | os.PathLike, captions_file: str | os.PathLike,
                   calibration_file: str | os.PathLike, preprocess: Callable, num_samples: int, seed: int,
                   batch_size: int = 32) -> DataLoader:
    """Deterministic loader of (images, captions) over :func:`holdout_pairs` of the calibration split."""
    dataset = CocoCaptions(images_dir, captions_file, transform=preprocess)
    calibration, _ = read_calibration(calibration_file, dataset)
    pairs = holdout_pairs(dataset, calibration, num_samples, seed)
    return DataLoader(dataset.pair_dataset(pairs), batch_size=batch_size, shuffle=False, num_workers=0,
                      collate_fn=collate_image_caption_pairs)
