"""Data layer: archives (fetch, verify, safe extract), COCO captions, image-folder classification,
calibration sampling, and extra evaluation sets (ImageNet-style folders, COCO / Flickr30k Karpathy retrieval) in
CLIP_benchmark's formats. The embedded default's builder is not library code: ``scripts/digits_dataset.py``."""
from .archive import COCO2017_ARCHIVES, fetch_and_extract, sha256_file
from .calibration import read_calibration, sample_calibration_pairs, write_calibration
from .coco import (CaptionPairs, CocoCaptions, collate_image_caption_pairs, collate_image_captions,
                   load_coco_captions_json)
from .evalsets import EvalDataset, EvalDatasetSpec, open_eval_dataset, parse_eval_datasets
from .imagefolder import ImageFolderClassification, load_classnames, load_templates
from .karpathy import CaptionedImages, coco_karpathy, flickr30k_karpathy, load_caption_annotations

__all__ = [
    "COCO2017_ARCHIVES", "fetch_and_extract", "sha256_file",
    "read_calibration", "sample_calibration_pairs", "write_calibration",
    "CaptionPairs", "CocoCaptions", "collate_image_caption_pairs", "collate_image_captions",
    "load_coco_captions_json",
    "ImageFolderClassification", "load_classnames", "load_templates",
    "CaptionedImages", "coco_karpathy", "flickr30k_karpathy", "load_caption_annotations",
    "EvalDataset", "EvalDatasetSpec", "open_eval_dataset", "parse_eval_datasets",
]
