"""Dataset sources from params: several archives extracted into one raw-data folder, all or nothing."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import ParamError
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

# A dataset name becomes a folder under data/raw/: no separators, no '.'/'..', no hidden names.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_dataset_name(name, key: str = "data.name") -> str:
    """``name`` if it is a plain folder name (e.g. ``digits``, ``coco2017``); ParamError otherwise."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise ParamError(f"{key} must be a plain folder name (letters, digits, '.', '_', '-'; no '/', '\\' "
                         f"or '..', not starting with '.'), got {name!r}")
    return name


def parse_archives(archives, key: str = "data.archives") -> list[dict]:
    """Validate the ``data.archives`` list: entries with a ``source`` string and an optional sha256."""
    if not isinstance(archives, list) or not archives:
        raise ParamError(f"{key} must be a non-empty list of {{source, sha256}} entries, got {archives!r}")
    parsed = []
    for i, entry in enumerate(archives):
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or not entry["source"]:
            raise ParamError(f"{key}[{i}] must be a mapping with a non-empty 'source', got {entry!r}")
        sha = entry.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                                or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ParamError(f"{key}[{i}].sha256 must be 64 hex digits or null, got {sha!r}")
        parsed.append({"source": entry["source"], "sha256": sha.lower() if sha else None})
    return parsed


def download_dataset(archives: list[dict], target: str | os.PathLike, progress: bool = True) -> Path:
    """Fetch, verify and extract every archive into ``target``; ``target`` appears only if all succeed."""
    archives = parse_archives(archives)
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
