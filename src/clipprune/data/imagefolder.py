"""Image-folder classification (ImageNet-val style) with CLIP_benchmark class names and templates.

Layout: ``root/<folder>/<image>`` with one folder per class. By default the folder of class ``k`` is
named ``classnames[k]`` (the embedded digits dataset); pass ``folders`` for datasets whose folders are
ids (ImageNet wnids), or ``folders="sorted"`` for torchvision's convention (sorted folder names give
the label order).

``classnames.json`` is a JSON list of names in label order; ``templates.json`` a JSON list of prompt
templates containing ``{c}``. Both also accept CLIP_benchmark's multi-dataset form (an object
mapping dataset name -> list) when ``key`` names the dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset

from ..errors import DataError
from .images import open_rgb

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def read_json(path: Path):
    """The parsed JSON of ``path``; one-line DataError naming the file if it is missing, not UTF-8 or not JSON."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text: {err.reason})") from None


def _string_list(path: Path, key: str | None, what: str) -> list[str]:
    data = read_json(path)
    if isinstance(data, dict):
        if key is None:
            raise DataError(f"{path}: expected a JSON list of {what}; the file maps dataset names to lists, "
                            f"so a dataset key is needed (one of: {', '.join(sorted(map(str, data))[:10])})")
        if key not in data:
            raise DataError(f"{path}: no {what} for dataset '{key}'")
        data = data[key]
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of {what}")
    for i, item in enumerate(data):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{path}: {what}[{i}] must be a non-empty string, got {item!r}")
    return data


def load_classnames(path: str | os.PathLike, key: str | None = None, allow_duplicates: bool = False) -> list[str]:
    """Class names in label order from a JSON list (or ``data[key]`` of a CLIP_benchmark mapping).

    Duplicates are an error unless ``allow_duplicates``: CLIP_benchmark's ``imagenet1k`` list names two
    classes "missile" and two "sunglasses", which is fine when labels come from sorted folders (wnids).
    """
    path = Path(path)
    names = _string_list(path, key, "class names")
    if allow_duplicates:
        return names
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: duplicate class name {name!r}")
        seen.add(name)
    return names


def load_templates(path: str | os.PathLike, key: str | None = None) -> list[str]:
    """Prompt templates, each containing ``{c}`` (the class name) and no other placeholder."""
    path = Path(path)
    templates = _string_list(path, key, "templates")
    for i, template in enumerate(templates):
        try:
            filled = template.format(c="\x00")
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"{path}: templates[{i}] {template!r} has a placeholder other than {{c}} ({err})") from None
        if "\x00" not in filled:
            raise DataError(f"{path}: templates[{i}] {template!r} must contain {{c}}")
    return templates


class ImageFolderClassification(Dataset):
    """(image, label) items from class subfolders; label k is ``classnames[k]``."""

    def __init__(self, root: str | os.PathLike, classnames: Sequence[str], transform: Callable | None = None,
                 folders: Sequence[str] | str | None = None):
        self.root = Path(root)
        self.classnames = list(classnames)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        if not self.classnames:
            raise DataError(f"{self.root}: classnames must not be empty")
        if folders is None:
            folder_names = self.classnames
        elif folders == "sorted":
            folder_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        else:
            folder_names = list(folders)
        if len(folder_names) != len(self.classnames):
            raise DataError(f"{self.root}: {len(folder_names)} class folders for {len(self.classnames)} class names")
        self.folders = folder_names

        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folder_names):
            class_dir = self.root / folder
            if not class_dir.is_dir():
                raise DataError(f"{class_dir}: folder for class {label} ({self.classnames[label]!r}) not found")
            # a dangling link is a missing image: keep it so that reading it fails, not silently skip it
            files = sorted(p for p in class_dir.iterdir()
                           if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DataError(f"{self.root}: no images found in the class folders")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):
        """The index-th image as PIL RGB (DataError naming the file if unreadable)."""
        return open_rgb(self.samples[index][0])

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]
