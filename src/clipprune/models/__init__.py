"""CLIP model adapters (open_clip, transformers), head/neuron masks, and physical pruning."""
from . import hf_adapter, open_clip_adapter  # noqa: F401  (each registers its family in MODEL_FAMILIES)
from .base import MODEL_FAMILIES, TOWERS, BlockLayout, BlockView, ClipModel, EncoderTower, Tower
from .loading import LOADERS, fixtures_root, load_model
from .masks import (apply_masks, full_masks, load_masks, mask_key, mask_shape, parse_mask_key, save_masks,
                    validate_masks)
from .prune import prune_model

__all__ = [
    "MODEL_FAMILIES", "TOWERS", "BlockLayout", "BlockView", "ClipModel", "EncoderTower", "Tower",
    "LOADERS", "fixtures_root", "load_model",
    "apply_masks", "full_masks", "load_masks", "mask_key", "mask_shape", "parse_mask_key", "save_masks",
    "validate_masks", "prune_model",
]
