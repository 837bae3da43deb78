"""Mask searches for head / neuron pruning (registry: ``get_search(params["search"]["method"])``).

Built in: ``mac`` (Kwon et al.'s best head count + top neurons) and ``uniform`` (same share per layer).
"""
from .common import check_constraint, check_metric, check_scores, mask_summary
from .registry import available_searches, get_search, register_search
from .mac import mac_search  # importing registers "mac"
from .uniform import uniform_search  # importing registers "uniform"

__all__ = ["available_searches", "check_constraint", "check_metric", "check_scores", "get_search",
           "mac_search", "mask_summary", "register_search", "uniform_search"]
