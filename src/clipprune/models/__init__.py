"""CLIP model adapters (open_clip, transformers), head/neuron masks, and physical pruning."""
from . import hf_adapter, open_clip_adapter, pruned  # noqa: F401  (they register MODEL_FAMILIES, MODEL_SOURCES)
from .base import MODEL_FAMILIES, MODEL_SOURCES, TOWERS, BlockLayout, BlockView, ClipModel, EncoderTower, Tower
from .loading import fixtures_root, load_model
from .masks import (apply_masks, full_masks, load_masks, mask_key, mask_shape, parse_mask_key, save_masks,
                    validate_masks)
from .prune import prune_model

__all__ = [
    "MODEL_FAMILIES", "MODEL_SOURCES", "TOWERS", "BlockLayout", "BlockView", "ClipModel", "EncoderTower", "Tower",
    "fixtures_root", "load_model",
    "apply_masks", "full_masks", "load_masks", "mask_key", "mask_shape", "parse_mask_key", "save_masks",
    "validate_masks", "prune_model",
]
