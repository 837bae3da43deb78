"""Retrieval test sets (COCO / Flickr30k Karpathy splits) in the on-disk formats of LAION's CLIP_benchmark.

Three annotation formats are read, told apart by file suffix and JSON shape:

* ``.json`` object in **COCO captions** format (``{"images": [{"id", "file_name"}], "annotations":
  [{"id", "image_id", "caption"}]}``): CLIP_benchmark's ``coco_test_karpathy.json`` for ``mscoco_captions``
  (file names relative to ``val2014/``). Images in ascending id order, captions in file order, as
  torchvision's ``CocoCaptions`` (which CLIP_benchmark uses) yields them.
* ``.json`` **list** of ``{"image": <relative path>, "caption": <string or list of strings>}``: the
  BLIP / LAVIS Karpathy files (``coco_karpathy_test.json`` with ``val2014/...`` paths, ``flickr30k_test.json``).
  Entries naming the same image are merged; images keep their first-appearance order.
* ``.txt`` (or ``.csv``) **CLIP_benchmark text**: a header line, then one ``<image file>,<caption>`` line per
  caption (``flickr30k_test_karpathy.txt``); the caption is everything after the first ``<ext>,``
  following the file name, so captions may contain commas. Images keep their first-appearance order.

:class:`CaptionedImages` is a torch Dataset whose item ``i`` is ``(image, [captions])``, the interface the
retrieval evaluation consumes (batch with :func:`clipprune.data.coco.collate_image_captions`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from torch.utils.data import Dataset

from ..errors import DataError
from .images import open_rgb
from .coco import load_coco_captions_json
from .imagefolder import read_json

# One caption line of CLIP_benchmark's text format: lazy file name up to the first "<image ext>,".
_TEXT_LINE = re.compile(r"^(?P<image>.+?\.(?:jpe?g|png|bmp|webp))\s*,(?P<caption>.*)$", re.IGNORECASE)


def _group(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(image, caption) pairs -> (image, [captions]) in first-appearance order of the images."""
    grouped: dict[str, list[str]] = {}
    for image, caption in pairs:
        grouped.setdefault(image, []).append(caption)
    return list(grouped.items())


def _coco_entries(path: Path) -> list[tuple[str, list[str]]]:
    data = load_coco_captions_json(path)
    captions: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    entries = []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if not captions[image["id"]]:
            raise DataError(f"{path}: image id {image['id']} ({image['file_name']}) has no caption annotation")
        entries.append((image["file_name"], captions[image["id"]]))
    return entries


def _karpathy_list_entries(path: Path, data: list) -> list[tuple[str, list[str]]]:
    pairs = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: [{i}] must be an object with 'image' and 'caption'")
        for key in ("image", "caption"):
            if key not in entry:
                raise DataError(f"{path}: [{i}] is missing key '{key}' (Karpathy list format)")
        image, captions = entry["image"], entry["caption"]
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}: [{i}].image must be a non-empty string, got {image!r}")
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not captions:
            raise DataError(f"{path}: [{i}].caption must be a caption string or a non-empty list of them")
        for j, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{path}: [{i}].caption[{j}] must be a non-empty string, got {caption!r}")
        pairs.extend((image, caption) for caption in captions)
    return _group(pairs)


def _text_entries(path: Path) -> list[tuple[str, list[str]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        match = _TEXT_LINE.match(line)
        if match is None:
            if number == 1:  # the header line ("image,caption"), skipped as CLIP_benchmark does
                continue
            raise DataError(f"{path}: line {number}: expected '<image file>.jpg,<caption>', got {line[:80]!r}")
        caption = match["caption"].strip()
        if not caption:
            raise DataError(f"{path}: line {number}: empty caption for {match['image']}")
        pairs.append((match["image"].strip(), caption))
    return _group(pairs)


def load_caption_annotations(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """``[(relative image path, [captions]), ...]`` from a retrieval annotation file in any supported format.

    DataError naming the file for a missing file, an unknown suffix, malformed content, an image without
    captions, or no images at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            entries = _coco_entries(path)
        elif isinstance(data, list):
            entries = _karpathy_list_entries(path, data)
        else:
            raise DataError(f"{path}: expected a COCO captions object or a list of {{image, caption}} entries")
    elif suffix in (".txt", ".csv"):
        entries = _text_entries(path)
    else:
        raise DataError(f"{path}: expected a .json (COCO captions or Karpathy list) or .txt "
                        f"(CLIP_benchmark '<image>,<caption>' lines) annotation file")
    if not entries:
        raise DataError(f"{path}: no captioned images")
    return entries


class CaptionedImages(Dataset):
    """Images under ``images_dir`` with their captions; item ``i`` is ``(image, [captions])``.

    Every image is checked to exist when the dataset is built, so a wrong folder fails before any
    encoding starts. ``transform`` maps a PIL RGB image to what the model takes; without it items carry
    PIL images.
    """

    def __init__(self, images_dir: str | os.PathLike, entries: Sequence[tuple[str, Sequence[str]]],
                 transform: Callable | None = None, source: str | os.PathLike | None = None):
        self.images_dir = Path(images_dir)
        self.transform = transform
        self.source = Path(source) if source is not None else self.images_dir
        if not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: images directory not found (images of {self.source})")
        self.entries: list[tuple[str, list[str]]] = []
        for image, captions in entries:
            relative = PurePosixPath(image)
            if relative.is_absolute() or ".." in relative.parts or Path(image).is_absolute():
                raise DataError(f"{self.source}: image path {image!r} must be relative to the images folder "
                                f"without '..'")
            if not captions:
                raise DataError(f"{self.source}: image {image} has no caption")
            self.entries.append((image, list(captions)))
        if not self.entries:
            raise DataError(f"{self.source}: no captioned images")
        missing = [image for image, _ in self.entries if not (self.images_dir / image).is_file()]
        if missing:
            raise DataError(f"{self.images_dir / missing[0]}: image file not found ({len(missing)} of "
                            f"{len(self.entries)} images named in {self.source} are missing under {self.images_dir})")

    @classmethod
    def from_annotations(cls, images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                         transform: Callable | None = None) -> "CaptionedImages":
        """Read ``annotation_file`` (any supported format) for images under ``images_dir``."""
        return cls(images_dir, load_caption_annotations(annotation_file), transform, source=annotation_file)

    @property
    def num_captions(self) -> int:
        return sum(len(captions) for _, captions in self.entries)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.entries[index][0]

    def captions(self, index: int) -> list[str]:
        return list(self.entries[index][1])

    def load_image(self, index: int):
        """The ``index``-th image as PIL RGB (DataError naming the file if it is missing or unreadable)."""
        return open_rgb(self.image_path(index), named_in=str(self.source))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.captions(index)


def coco_karpathy(images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                  transform: Callable | None = None) -> CaptionedImages:
    """COCO Karpathy test (5000 images): CLIP_benchmark's ``coco_test_karpathy.json`` with ``images_dir`` =
    ``val2014/``, or BLIP's ``coco_karpathy_test.json`` with ``images_dir`` = the folder holding ``val2014/``."""
    return CaptionedImages.from_annotations(images_dir, annotation_file, transform)


def flickr30k_karpathy(images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                       transform: Callable | None = None) -> CaptionedImages:
    """Flickr30k Karpathy test (1000 images): CLIP_benchmark's ``flickr30k_test_karpathy.txt`` with
    ``images_dir`` = the folder of the ``.jpg`` files (or any other supported annotation format)."""
    return CaptionedImages.from_annotations(images_dir, annotation_file, transform)
