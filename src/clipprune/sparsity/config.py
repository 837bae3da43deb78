"""``SparsityConfig``: the ``sparsity:`` params section as the sparsifiers take it.

The section is validated by ``clipprune.config`` (``SparsitySection``: keys, defaults, mask types, targets,
bounds); the mask-type and target parsers live there and are re-exported here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from clipprune.config import (FISHER_DTYPES, MASK_TYPES, MaskType, SparsitySection, check_target, check_targets,
                              parse_mask_type, parse_section)

__all__ = ["FISHER_DTYPES", "MASK_TYPES", "MaskType", "SparsityConfig", "check_target", "check_targets",
           "parse_config", "parse_mask_type", "sparsity_config", "target_name"]


def target_name(target: float) -> str:
    """The folder / report name of a target: its shortest decimal form ("0.5", "0.75")."""
    return repr(float(target))


@dataclass(frozen=True)
class SparsityConfig:
    """Everything a sparsifier needs besides the model and the data (see params.yaml ``sparsity:``)."""

    method: str = "cap"
    mask_type: str = "unstructured"
    targets: tuple[float, ...] = (0.5, 0.6, 0.75)
    towers: tuple[str, ...] = ("vision",)
    loss: str = "contrastive"
    batch_size: int = 32
    num_grads: int = 1024
    damp: float = 1e-7
    fisher_block_size: int = 50
    fisher_dtype: str = "float32"
    chunk_layers: int | str | None = "auto"  # auto | null (all layers) | layers per pass
    offload: bool = False
    hessian_damp: float = 0.01  # sparsegpt: λ = hessian_damp · mean(diag XXᵀ)
    num_recomputations: int = 1  # steps to each target, gradients / Fisher recomputed between them
    options: dict = field(default_factory=dict)

    @property
    def mask(self) -> MaskType:
        return parse_mask_type(self.mask_type)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["towers"] = list(self.towers)
        return out


def sparsity_config(section: SparsitySection) -> SparsityConfig:
    """The validated section (``clipprune.config.parse_params(...).sparsity``) as a ``SparsityConfig``."""
    return SparsityConfig(**{name: getattr(section, name) for name in SparsityConfig.__dataclass_fields__})


def parse_config(section, methods: Iterable[str] | None = None) -> SparsityConfig:
    """A ``sparsity`` mapping (None: every default) validated on its own; ``methods``: the registered method
    names to check ``method`` against (None: any non-empty name)."""
    choices = {"sparsity.method": methods} if methods is not None else None
    return sparsity_config(parse_section("sparsity", {} if section is None else section, choices=choices))
