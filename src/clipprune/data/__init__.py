"""Data layer: archives (fetch, verify, safe extract), COCO captions, image-folder classification,
calibration sampling, and the embedded default digits dataset builder."""
from .archive import COCO2017_ARCHIVES, fetch_and_extract, sha256_file
from .calibration import read_calibration, sample_calibration_pairs, write_calibration
from .coco import (CaptionPairs, CocoCaptions, collate_image_caption_pairs, collate_image_captions,
                   load_coco_captions_json)
from .imagefolder import ImageFolderClassification, load_classnames, load_templates

__all__ = [
    "COCO2017_ARCHIVES", "fetch_and_extract", "sha256_file",
    "read_calibration", "sample_calibration_pairs", "write_calibration",
    "CaptionPairs", "CocoCaptions", "collate_image_caption_pairs", "collate_image_captions",
    "load_coco_captions_json",
    "ImageFolderClassification", "load_classnames", "load_templates",
]
