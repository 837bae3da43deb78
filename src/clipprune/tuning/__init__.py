"""Mask rearrangement and least-squares mask tuning (Kwon et al.), for both CLIP families."""
from .lsq import LeastSquaresStats, TuningWarning, solve_scales, tune_masks
from .rearrange import LayerResult, rearrange_layer, rearrange_masks, rearrangement_objective

__all__ = [
    "LeastSquaresStats", "TuningWarning", "solve_scales", "tune_masks",
    "LayerResult", "rearrange_layer", "rearrange_masks", "rearrangement_objective",
]
