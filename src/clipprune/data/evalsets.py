"""Extra evaluation datasets from params (``evaluate.datasets``), in CLIP_benchmark's on-disk formats.

Each entry of the list names one dataset::

    - name: imagenet1k                 # key of its metrics in reports/metrics.json
      type: imagefolder                # zero-shot classification
      root: data/eval/imagenet1k/val   # one folder per class; sorted folder names = label order (wnids)
      classnames: data/eval/en_classnames.json
      templates: data/eval/en_zeroshot_classification_templates.json
      key: imagenet1k                  # optional: dataset key in CLIP_benchmark-style JSON (default: name)
      folders: sorted                  # optional: sorted (default) | classnames (folder k named classnames[k])
      max_images: null                 # optional: evenly spaced subset of this many images
    - name: mscoco_karpathy_test
      type: coco_karpathy              # image <-> text retrieval
      root: data/eval/mscoco_captions/val2014
      annotation: data/eval/mscoco_captions/coco_test_karpathy.json
    - name: flickr30k_karpathy_test
      type: flickr30k_karpathy
      root: data/eval/flickr30k/flickr30k_images
      annotation: data/eval/flickr30k/flickr30k_test_karpathy.txt

Relative paths are relative to the working directory (the repository root when a stage runs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset

from ..errors import ParamError
from .imagefolder import ImageFolderClassification, load_classnames, load_templates
from .karpathy import CaptionedImages
from .sources import check_dataset_name

CLASSIFICATION_TYPES = ("imagefolder",)
RETRIEVAL_TYPES = ("coco_karpathy", "flickr30k_karpathy")
DATASET_TYPES = CLASSIFICATION_TYPES + RETRIEVAL_TYPES

_REQUIRED = {"imagefolder": ("root", "classnames", "templates"),
             "coco_karpathy": ("root", "annotation"),
             "flickr30k_karpathy": ("root", "annotation")}
_OPTIONAL = {"imagefolder": ("key", "folders", "max_images"),
             "coco_karpathy": ("max_images",),
             "flickr30k_karpathy": ("max_images",)}
_FOLDER_MODES = ("sorted", "classnames")


@dataclass(frozen=True)
class EvalDatasetSpec:
    """One validated entry of ``evaluate.datasets`` (paths not yet checked on disk)."""

    name: str
    type: str
    root: Path
    annotation: Path | None = None
    classnames: Path | None = None
    templates: Path | None = None
    key: str | None = None
    folders: str = "sorted"
    max_images: int | None = None

    @property
    def task(self) -> str:
        """``zeroshot`` or ``retrieval``."""
        return "zeroshot" if self.type in CLASSIFICATION_TYPES else "retrieval"


@dataclass(frozen=True)
class EvalDataset:
    """An opened evaluation dataset: items carry PIL images (the model's preprocess is applied later)."""

    spec: EvalDatasetSpec
    dataset: Dataset
    classnames: list[str] | None = None
    templates: list[str] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_captions(self) -> int | None:
        """Captions of a retrieval set (of its subset when ``max_images`` is set); None for classification."""
        dataset, indices = self.dataset, None
        if isinstance(dataset, Subset):
            dataset, indices = dataset.dataset, dataset.indices
        if not isinstance(dataset, CaptionedImages):
            return None
        return sum(len(dataset.entries[i][1]) for i in (range(len(dataset)) if indices is None else indices))


def _path(entry: dict, field: str, where: str, base: Path) -> Path:
    value = entry[field]
    if not isinstance(value, str) or not value.strip():
        raise ParamError(f"{where}.{field} must be a non-empty path string, got {value!r}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def parse_eval_datasets(value, key: str = "evaluate.datasets", base: str | os.PathLike = ".") -> list[EvalDatasetSpec]:
    """Validate the ``evaluate.datasets`` list (null or [] for none); ParamError naming the entry and field."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError(f"{key} must be a list of datasets (each with name, type, root, ...), got {value!r}")
    base = Path(base)
    specs: list[EvalDatasetSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ParamError(f"{where} must be a mapping with name, type and root, got {entry!r}")
        if "type" not in entry:
            raise ParamError(f"{where}.type is required (one of {', '.join(DATASET_TYPES)})")
        kind = entry["type"]
        if kind not in DATASET_TYPES:
            raise ParamError(f"{where}.type must be one of {', '.join(DATASET_TYPES)}; got {kind!r}")
        if "name" not in entry:
            raise ParamError(f"{where}.name is required (the key of its metrics)")
        name = check_dataset_name(entry["name"], f"{where}.name")
        if name in names:
            raise ParamError(f"{where}.name {name!r} is used by another entry of {key}")
        names.add(name)
        allowed = {"name", "type", *_REQUIRED[kind], *_OPTIONAL[kind]}
        unknown = sorted(set(map(str, entry)) - allowed)
        if unknown:
            raise ParamError(f"{where}.{unknown[0]} is not a field of type {kind} "
                             f"(fields: {', '.join(sorted(allowed))})")
        for field in _REQUIRED[kind]:
            if field not in entry:
                raise ParamError(f"{where}.{field} is required for type {kind}")
        max_images = entry.get("max_images")
        if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                       or max_images < 1):
            raise ParamError(f"{where}.max_images must be a positive integer or null, got {max_images!r}")
        fields = {"root": _path(entry, "root", where, base), "max_images": max_images}
        if kind in CLASSIFICATION_TYPES:
            dataset_key = entry.get("key", name)
            if not isinstance(dataset_key, str) or not dataset_key:
                raise ParamError(f"{where}.key must be a non-empty string, got {dataset_key!r}")
            folders = entry.get("folders", "sorted")
            if folders not in _FOLDER_MODES:
                raise ParamError(f"{where}.folders must be one of {', '.join(_FOLDER_MODES)}; got {folders!r}")
            fields.update(classnames=_path(entry, "classnames", where, base),
                          templates=_path(entry, "templates", where, base), key=dataset_key, folders=folders)
        else:
            fields.update(annotation=_path(entry, "annotation", where, base))
        specs.append(EvalDatasetSpec(name=name, type=kind, **fields))
    return specs


def _evenly_spaced(dataset: Dataset, limit: int | None) -> Dataset:
    """The first, and then every (n / limit)-th, item: a subset that spans all classes of a sorted folder."""
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    return Subset(dataset, [i * n // limit for i in range(limit)])


def open_eval_dataset(spec: EvalDatasetSpec) -> EvalDataset:
    """Read and check one dataset's files (DataError naming the file); items carry PIL images."""
    if spec.type in CLASSIFICATION_TYPES:
        sorted_folders = spec.folders == "sorted"
        # labels of sorted folders are indices, so two classes may share a name (as in CLIP_benchmark's imagenet1k)
        classnames = load_classnames(spec.classnames, spec.key, allow_duplicates=sorted_folders)
        templates = load_templates(spec.templates, spec.key)
        folder = ImageFolderClassification(spec.root, classnames, folders="sorted" if sorted_folders else None)
        return EvalDataset(spec, _evenly_spaced(folder, spec.max_images), classnames, templates)
    captioned = CaptionedImages.from_annotations(spec.root, spec.annotation)
    return EvalDataset(spec, _evenly_spaced(captioned, spec.max_images))
