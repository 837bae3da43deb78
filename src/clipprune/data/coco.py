"""COCO captions (real format, read with pycocotools) as image / caption datasets.

``CocoCaptions`` validates the annotation JSON (one-line DataError naming the file), indexes it with
``pycocotools.coco.COCO`` and offers:

* ``image_ids``, ``captions(image_id)``, ``pairs()`` (sorted (image_id, annotation_id)), ``load_image``;
* a torch Dataset over images: item ``i`` is ``(image, [captions])`` for the i-th sorted image id,
  batched with ``collate_image_captions`` (retrieval evaluation);
* ``pair_dataset(pairs)``: a Dataset of ``(image, caption)`` for given (image_id, annotation_id)
  pairs, batched with ``collate_image_caption_pairs`` (calibration batches).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import open_rgb

_IMAGE_KEYS = ("id", "file_name")
_ANNOTATION_KEYS = ("id", "image_id", "caption")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_coco_captions_json(path: str | os.PathLike) -> dict:
    """Read and validate a COCO captions JSON file; DataError naming the file for any defect."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text: {err.reason})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations' (COCO captions format)")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}' (COCO captions format)")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")

    image_ids: set[int] = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DataError(f"{path}: images[{i}] must be an object")
        for key in _IMAGE_KEYS:
            if key not in image:
                raise DataError(f"{path}: images[{i}] is missing key '{key}'")
        if not _is_int(image["id"]):
            raise DataError(f"{path}: images[{i}].id must be an integer, got {image['id']!r}")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DataError(f"{path}: images[{i}].file_name must be a non-empty string")
        if image["id"] in image_ids:
            raise DataError(f"{path}: duplicate image id {image['id']}")
        image_ids.add(image["id"])

    annotation_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{i}] must be an object")
        for key in _ANNOTATION_KEYS:
            if key not in ann:
                raise DataError(f"{path}: annotations[{i}] is missing key '{key}'")
        if not _is_int(ann["id"]) or not _is_int(ann["image_id"]):
            raise DataError(f"{path}: annotations[{i}].id and .image_id must be integers")
        if not isinstance(ann["caption"], str):
            raise DataError(f"{path}: annotations[{i}].caption must be a string")
        if ann["image_id"] not in image_ids:
            raise DataError(f"{path}: annotations[{i}] refers to unknown image_id {ann['image_id']}")
        if ann["id"] in annotation_ids:
            raise DataError(f"{path}: duplicate annotation id {ann['id']}")
        annotation_ids.add(ann["id"])
    return data


class CocoCaptions(Dataset):
    """Images and captions of one COCO captions split.

    ``images_dir`` holds the files named by ``images[].file_name``; ``transform`` maps a PIL RGB
    image to what the model takes (e.g. a tensor); without it items carry PIL images.
    """

    def __init__(self, images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                 transform: Callable | None = None):
        from pycocotools.coco import COCO

        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform
        if not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: images directory not found")
        data = load_coco_captions_json(self.annotation_file)
        self.coco = COCO()  # built from the validated dict: the file is parsed once
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self._image_ids = sorted(self.coco.imgs)
        self._annotation_ids = {
            image_id: sorted(ann["id"] for ann in self.coco.imgToAnns.get(image_id, []))
            for image_id in self._image_ids
        }

    # ---- index
    @property
    def image_ids(self) -> list[int]:
        """All image ids, sorted."""
        return list(self._image_ids)

    def annotation_ids(self, image_id: int) -> list[int]:
        """Caption annotation ids of one image, sorted."""
        self._check_image(image_id)
        return list(self._annotation_ids[image_id])

    def captions(self, image_id: int) -> list[str]:
        """Captions of one image, in annotation-id order."""
        return [self.coco.anns[a]["caption"] for a in self.annotation_ids(image_id)]

    def caption(self, annotation_id: int) -> str:
        if annotation_id not in self.coco.anns:
            raise DataError(f"{self.annotation_file}: no caption annotation with id {annotation_id}")
        return self.coco.anns[annotation_id]["caption"]

    def pairs(self) -> list[tuple[int, int]]:
        """Every (image_id, annotation_id) pair, sorted."""
        return [(i, a) for i in self._image_ids for a in self._annotation_ids[i]]

    @property
    def num_pairs(self) -> int:
        return sum(len(v) for v in self._annotation_ids.values())

    def check_pair(self, image_id: int, annotation_id: int) -> None:
        """DataError unless the annotation exists and belongs to the image."""
        ann = self.coco.anns.get(annotation_id)
        if ann is None or ann["image_id"] != image_id:
            raise DataError(f"{self.annotation_file}: no caption {annotation_id} for image {image_id}")

    def _check_image(self, image_id: int) -> None:
        if image_id not in self.coco.imgs:
            raise DataError(f"{self.annotation_file}: no image with id {image_id}")

    # ---- images
    def image_path(self, image_id: int) -> Path:
        self._check_image(image_id)
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int):
        """The image as a PIL RGB image (DataError naming the file if it is missing or unreadable)."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: image file not found (image id {image_id} in {self.annotation_file})")
        return open_rgb(path)

    def _transformed(self, image_id: int):
        image = self.load_image(image_id)
        return self.transform(image) if self.transform is not None else image

    # ---- torch Dataset over images
    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, index: int):
        """(image, list of its captions) for the ``index``-th sorted image id."""
        image_id = self._image_ids[index]
        return self._transformed(image_id), self.captions(image_id)

    def pair_dataset(self, pairs: Iterable) -> "CaptionPairs":
        """A Dataset of (image, caption) for the given pairs (tuples or dicts with image_id, annotation_id)."""
        return CaptionPairs(self, pairs)


class CaptionPairs(Dataset):
    """(image, caption) items for a fixed list of (image_id, annotation_id) pairs, e.g. calibration."""

    def __init__(self, dataset: CocoCaptions, pairs: Iterable):
        self.dataset = dataset
        self.pairs: list[tuple[int, int]] = []
        for pair in pairs:
            image_id, annotation_id = ((pair["image_id"], pair["annotation_id"]) if isinstance(pair, dict)
                                       else tuple(pair))
            dataset.check_pair(image_id, annotation_id)
            self.pairs.append((image_id, annotation_id))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_id, annotation_id = self.pairs[index]
        return self.dataset._transformed(image_id), self.dataset.caption(annotation_id)


def _stack(images: Sequence):
    return torch.stack(list(images)) if images and isinstance(images[0], torch.Tensor) else list(images)


def collate_image_captions(batch: Sequence[tuple]) -> tuple:
    """Batch of (image, [captions]) -> (images tensor [or list of PIL], list of caption lists)."""
    images, captions = zip(*batch) if batch else ((), ())
    return _stack(images), [list(c) for c in captions]


def collate_image_caption_pairs(batch: Sequence[tuple]) -> tuple:
    """Batch of (image, caption) -> (images tensor [or list of PIL], list of captions)."""
    images, captions = zip(*batch) if batch else ((), ())
    return _stack(images), list(captions)
