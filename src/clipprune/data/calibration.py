"""Calibration set: a seeded sample of image–caption pairs, stored as ids in a JSON file.

Sampling spreads over images first (one caption per image while images last), so a small calibration
set sees as many different images as possible. File format (``data/prepared/calibration.json``)::

    {"meta": {...}, "num_samples": N, "pairs": [{"annotation_id": a, "image_id": i}, ...]}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, ParamError
from ..io import write_json
from .coco import CocoCaptions


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def sample_calibration_pairs(dataset: CocoCaptions, num_samples: int, seed: int) -> list[dict]:
    """``num_samples`` distinct (image_id, annotation_id) pairs, deterministic for ``seed``.

    Rounds over the images in a fresh random order each round, taking one not-yet-used caption per
    image, until enough pairs are drawn: no image gets a second caption before every image has one.
    Uses its own numpy Generator (no global random state).
    """
    available = {i: dataset.annotation_ids(i) for i in dataset.image_ids}
    available = {i: anns for i, anns in available.items() if anns}
    total = sum(len(a) for a in available.values())
    if num_samples > total:
        raise ParamError(f"calibrate.num_samples must be <= {total} (pairs in {dataset.annotation_file}), "
                         f"got {num_samples}")
    rng = np.random.default_rng(int(seed))
    remaining = {i: list(anns) for i, anns in available.items()}
    pairs: list[dict] = []
    while len(pairs) < num_samples:
        images = sorted(i for i, anns in remaining.items() if anns)
        for pos in rng.permutation(len(images)):
            image_id = images[int(pos)]
            anns = remaining[image_id]
            annotation_id = anns.pop(int(rng.integers(len(anns))))
            pairs.append({"image_id": int(image_id), "annotation_id": int(annotation_id)})
            if len(pairs) == num_samples:
                break
    return pairs


def _validate_pairs(pairs, where: str) -> list[dict]:
    if not isinstance(pairs, (list, tuple)):
        raise DataError(f"{where}: 'pairs' must be a list")
    out, seen = [], set()
    for k, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not {"image_id", "annotation_id"} <= set(pair):
            raise DataError(f"{where}: pairs[{k}] must be an object with image_id and annotation_id")
        image_id, annotation_id = pair["image_id"], pair["annotation_id"]
        if not _is_int(image_id) or not _is_int(annotation_id):
            raise DataError(f"{where}: pairs[{k}] ids must be integers, got {pair!r}")
        key = (int(image_id), int(annotation_id))
        if key in seen:
            raise DataError(f"{where}: pairs[{k}] repeats image {key[0]} caption {key[1]}")
        seen.add(key)
        out.append({"image_id": key[0], "annotation_id": key[1]})
    if not out:
        raise DataError(f"{where}: 'pairs' is empty")
    return out


def write_calibration(path: str | os.PathLike, pairs: Sequence[dict], meta: dict | None = None) -> Path:
    """Write the calibration pairs and metadata (e.g. source file, seed) atomically as JSON."""
    path = Path(path)
    clean = _validate_pairs(list(pairs), f"calibration pairs for {path}")
    meta = dict(meta or {})
    write_json(path, {"meta": meta, "num_samples": len(clean), "pairs": clean})
    return path


def read_calibration(path: str | os.PathLike, dataset: CocoCaptions | None = None) -> tuple[list[dict], dict]:
    """Read (pairs, meta) from a calibration file; with ``dataset``, also check every pair exists in it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: calibration file not found (run the calibrate stage)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text: {err.reason})") from None
    if not isinstance(data, dict) or "pairs" not in data:
        raise DataError(f"{path}: missing key 'pairs' (expected a calibration file)")
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{path}: 'meta' must be an object")
    pairs = _validate_pairs(data["pairs"], str(path))
    if "num_samples" in data and data["num_samples"] != len(pairs):
        raise DataError(f"{path}: num_samples is {data['num_samples']} but the file lists {len(pairs)} pairs")
    if dataset is not None:
        for k, pair in enumerate(pairs):
            ann = dataset.coco.anns.get(pair["annotation_id"])
            if ann is None or ann["image_id"] != pair["image_id"]:
                raise DataError(f"{path}: pairs[{k}] (image {pair['image_id']}, caption {pair['annotation_id']}) "
                                f"is not in {dataset.annotation_file}")
    return pairs, meta
