"""Mask searches for head / neuron pruning (registry: ``get_search(params["search"]["method"])``).

Built in: ``mac`` (Kwon et al.'s best head count + top neurons) and ``uniform`` (same share per layer).
"""
from .common import check_scores, mask_summary
from .registry import available_searches, get_search, register_search
from .mac import mac_search  # importing registers "mac"
from .uniform import uniform_search  # importing registers "uniform"
from . import adaptive as _adaptive  # noqa: F401  (AMP: registers "adaptive", needs the model)
from . import param_sum as _param_sum, threshold as _threshold  # noqa: F401  (LFPR: registers "param_sum", "threshold")

__all__ = ["available_searches", "check_scores", "get_search",
           "mac_search", "mask_summary", "register_search", "uniform_search"]
