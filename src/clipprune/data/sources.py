"""Dataset sources from params: several archives extracted into one raw-data folder, all or nothing."""
from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
from pathlib import Path

from ..errors import DataError
from ..io import atomic_dir
from .archive import ExtractionBudget, fetch_and_extract

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

    The archives share one ``MAX_EXTRACTED_BYTES`` budget. Archives may fill the same folders, but a path
    that two archives both provide as a file (or as a file in one and a folder in the other, or under
    names that differ only in case / Unicode normalisation) is an error naming both archives.
    """
    target = Path(target)
    budget = ExtractionBudget()
    with atomic_dir(target) as staging:
        # each archive extracts beside the staging folder (not inside: any name could be a member's)
        parts = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
        try:
            owners: dict[str, int] = {}  # merged path -> index of the archive that provided it
            for i, entry in enumerate(archives):
                part = parts / str(i)
                fetch_and_extract(entry["source"], part, sha256=entry["sha256"],
                                  name=f"data.archives[{i}]", progress=progress, budget=budget)
                _merge_into(part, staging, "", i, owners, archives)  # merge archive roots (COCO ships three)
                shutil.rmtree(part)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    return target


def _merge_into(src_dir: Path, dest_dir: Path, rel: str, index: int, owners: dict[str, int],
                archives: list[dict]) -> None:
    """Move the entries of ``src_dir`` (extracted from archive ``index``) into ``dest_dir``."""
    existing = {_fold(p.name): p.name for p in dest_dir.iterdir()}
    for src in sorted(src_dir.iterdir()):
        path = f"{rel}{src.name}"
        held = existing.get(_fold(src.name))
        if held is None:
            os.replace(src, dest_dir / src.name)
            owners[path] = index
            existing[_fold(src.name)] = src.name
            continue
        dest = dest_dir / held
        if held == src.name and src.is_dir() and dest.is_dir():
            _merge_into(src, dest, f"{path}/", index, owners, archives)
            continue
        other = _owner(f"{rel}{held}", owners)
        why = ("differ only in letter case or Unicode normalisation" if held != src.name
               else "are both there as a file" if not (src.is_dir() or dest.is_dir())
               else "are there as a file in one and a folder in the other")
        raise DataError(f"data.archives[{index}]: {archives[index]['source']}: {path!r} clashes with "
                        f"{rel + held!r} from data.archives[{other}] ({archives[other]['source']}): they {why}")


def _fold(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def _owner(path: str, owners: dict[str, int]) -> int:
    """The archive that provided ``path`` or the nearest folder above it."""
    while path not in owners:
        path = path.rpartition("/")[0]
    return owners[path]
