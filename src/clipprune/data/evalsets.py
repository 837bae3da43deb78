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

Relative paths are relative to the working directory (the repository root when a stage runs); in
params.yaml they must stay inside ``data/eval/``, the folder the evaluate stages depend on
(``clipprune.config``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset, Subset

# the entries are validated (and their specs defined) with the rest of params.yaml
from ..config import CLASSIFICATION_TYPES, DATASET_TYPES, RETRIEVAL_TYPES, EvalDatasetSpec, parse_eval_datasets
from .imagefolder import ImageFolderClassification, load_classnames, load_templates
from .karpathy import CaptionedImages

__all__ = ["CLASSIFICATION_TYPES", "DATASET_TYPES", "RETRIEVAL_TYPES", "EvalDataset", "EvalDatasetSpec",
           "open_eval_dataset", "parse_eval_datasets"]


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
