"""Dataset sources from params: several archives extracted into one raw-data folder, all or nothing."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..io import atomic_dir
from .archive import fetch_and_extract

# Official COCO 2017 archives (https://cocodataset.org/#download), for `data.archives` on real runs.
COCO2017_LAYOUT = {
    "train_images": "train2017",
    "train_captions": "annotations/captions_train2017.json",
    "val_images": "val2017",
    "val_captions": "annotations/captions_val2017.json",
    "classification": None,
}


def download_dataset(archives: list[dict], target: str | os.PathLike, progress: bool = True) -> Path:
    """Fetch, verify and extract every archive into ``target``; ``target`` appears only if all succeed.

    ``archives``: ``data.archives`` as ``clipprune.config.parse_archives`` returns it (``{source, sha256}``).
    """
    target = Path(target)
    with atomic_dir(target) as staging:
        for i, entry in enumerate(archives):
            part = staging / f".part{i}"
            fetch_and_extract(entry["source"], part, sha256=entry["sha256"],
                              name=f"data.archives[{i}]", progress=progress)
            for child in sorted(part.iterdir()):  # merge archive roots (COCO ships three)
                dest = staging / child.name
                if dest.exists():
                    _merge_tree(child, dest)
                else:
                    os.replace(child, dest)
            shutil.rmtree(part)
    return target


def _merge_tree(src: Path, dest: Path) -> None:
    for child in sorted(src.iterdir()):
        if child.is_dir() and (dest / child.name).is_dir():
            _merge_tree(child, dest / child.name)
        else:
            os.replace(child, dest / child.name)
