"""Mask rearrangement and least-squares mask tuning (Kwon et al.), for both CLIP families."""
from .lsq import LeastSquaresStats, TuningWarning, solve_scales, tune_masks
from .rearrange import (BothStartsResult, LayerResult, greedy_assignment, rearrange_layer, rearrange_layer_from_both,
                        rearrange_masks, rearrangement_objective)

__all__ = [
    "LeastSquaresStats", "TuningWarning", "solve_scales", "tune_masks",
    "LayerResult", "BothStartsResult", "greedy_assignment", "rearrange_layer", "rearrange_layer_from_both",
    "rearrange_masks", "rearrangement_objective",
]
