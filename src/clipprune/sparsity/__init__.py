"""Weight-level sparsity (unstructured, block4, N:M): CAP, FastCAP, SparseGPT, Wanda and global magnitude
(registry).

``sparsity_config(parse_params(params).sparsity)`` (or ``parse_config(section)``) gives the typed config
(validated by ``clipprune.config``); ``sparsify(model, config, loader)`` returns the new weights per target; ``save_sparse`` / ``load_sparse`` store them compactly (bitmask + values).
"""
from .config import MASK_TYPES, MaskType, SparsityConfig, check_target, check_targets, parse_config, \
    parse_mask_type, sparsity_config, target_name
from .registry import GradientSource, SparsityResult, available_methods, get_method, register_method
from . import cap as _cap  # noqa: F401  (registers "cap")
from . import fastcap as _fastcap  # noqa: F401  (registers "fastcap")
from . import magnitude as _magnitude  # noqa: F401  (registers "magnitude")
from . import sparsegpt as _sparsegpt  # noqa: F401  (registers "sparsegpt")
from . import wanda as _wanda  # noqa: F401  (registers "wanda")
from .cap import effective_block_size
from .export import load_sparse, pack_sparse, save_sparse, unpack_sparse
from .fisher import BlockFisher, damped_fisher
from .layers import prunable_linears
from .obs import obs_sweep
from .run import apply_weights, recomputation_schedule, sparsify, sparsity_stats

__all__ = [
    "MASK_TYPES", "MaskType", "SparsityConfig", "check_target", "check_targets", "parse_config",
    "parse_mask_type", "sparsity_config", "target_name", "GradientSource", "SparsityResult", "available_methods",
    "get_method",
    "register_method", "effective_block_size", "load_sparse", "pack_sparse", "save_sparse", "unpack_sparse",
    "BlockFisher", "damped_fisher", "prunable_linears", "obs_sweep", "apply_weights", "recomputation_schedule",
    "sparsify",
    "sparsity_stats",
]
