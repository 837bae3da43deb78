"""The ``sparsity:`` params section, validated into a ``SparsityConfig`` (one-line ParamErrors naming the key)."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field

from clipprune.errors import ParamError

MASK_TYPES = ("unstructured", "block4", "N:M")
TOWER_CHOICES = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}
FISHER_DTYPES = ("float32", "float64")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class MaskType:
    """A parsed ``sparsity.mask_type``.

    ``kind``: "unstructured" | "block4" | "nm"; ``group``: weights pruned together (1, or 4 for block4);
    ``n``/``m``: for N:M, keep ``n`` in every ``m`` consecutive weights along the input dimension.
    """

    kind: str
    group: int = 1
    n: int = 0
    m: int = 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def alignment(self) -> int:
        """Weights along the input dimension that a mask unit or N:M group spans."""
        return self.m if self.kind == "nm" else self.group

    @property
    def sparsity(self) -> float | None:
        """The sparsity the mask type fixes by itself (N:M), else None (set by the target)."""
        return (self.m - self.n) / self.m if self.kind == "nm" else None


def parse_mask_type(value, key: str = "sparsity.mask_type") -> MaskType:
    """``"unstructured"``, ``"block4"`` or ``"N:M"`` with 0 < N < M (e.g. ``"2:4"``)."""
    if value == "unstructured":
        return MaskType("unstructured")
    if value == "block4":
        return MaskType("block4", group=4)
    match = _NM.match(value) if isinstance(value, str) else None
    if match:
        n, m = int(match[1]), int(match[2])
        if 0 < n < m:
            return MaskType("nm", n=n, m=m)
        raise ParamError(f"{key} N:M needs 0 < N < M, got {value!r}")
    hint = ""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        # YAML 1.1 (PyYAML, DVC's -S) reads an unquoted 2:4 as the base-60 number 2*60+4
        hint = f" (an unquoted {value // 60}:{value % 60} in YAML is the number {value}: write \"{value // 60}:{value % 60}\")"
    raise ParamError(f"{key} must be unstructured, block4 or N:M (e.g. '2:4'), got {value!r}{hint}")


def check_target(value, key: str = "sparsity.targets") -> float:
    """A sparsity target: a number strictly between 0 and 1 (the fraction of weights set to zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 < value < 1:
        raise ParamError(f"{key} must be numbers in (0, 1) (fractions of zero weights), got {value!r}")
    return float(value)


def check_targets(values, key: str = "sparsity.targets") -> tuple[float, ...]:
    """A non-empty list of distinct targets in (0, 1), sorted ascending."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ParamError(f"{key} must be a non-empty list of numbers in (0, 1), got {values!r}")
    targets = [check_target(v, key) for v in values]
    if len(set(targets)) != len(targets):
        raise ParamError(f"{key} must not repeat a value, got {values!r}")
    return tuple(sorted(targets))


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
    chunk_layers: int | None = None
    offload: bool = False
    options: dict = field(default_factory=dict)

    @property
    def mask(self) -> MaskType:
        return parse_mask_type(self.mask_type)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["towers"] = list(self.towers)
        return out


def _int(section: dict, key: str, default, low: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParamError(f"sparsity.{key} must be an integer >= {low}, got {value!r}")
    return value


def parse_config(section, methods=None) -> SparsityConfig:
    """Validate the ``sparsity`` params mapping; ``methods``: the registered method names (None: skip)."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ParamError(f"sparsity must be a mapping of options, got {section!r}")
    defaults = SparsityConfig()
    known = set(defaults.as_dict())
    unknown = sorted(set(section) - known)
    if unknown:
        raise ParamError(f"sparsity: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    method = section.get("method", defaults.method)
    if methods is not None and method not in methods:
        raise ParamError(f"sparsity.method must be one of {', '.join(sorted(methods))}; got {method!r}")
    mask_type = section.get("mask_type", defaults.mask_type)
    parse_mask_type(mask_type)
    towers = section.get("towers", "vision")
    if towers not in TOWER_CHOICES:
        raise ParamError(f"sparsity.towers must be one of vision, text, both; got {towers!r}")
    loss = section.get("loss", defaults.loss)
    if not isinstance(loss, str) or not loss:
        raise ParamError(f"sparsity.loss must be a loss name (e.g. contrastive), got {loss!r}")
    damp = section.get("damp", defaults.damp)
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not math.isfinite(damp) or damp <= 0:
        raise ParamError(f"sparsity.damp must be a positive number, got {damp!r}")
    fisher_dtype = section.get("fisher_dtype", defaults.fisher_dtype)
    if fisher_dtype not in FISHER_DTYPES:
        raise ParamError(f"sparsity.fisher_dtype must be one of {', '.join(FISHER_DTYPES)}; got {fisher_dtype!r}")
    chunk = section.get("chunk_layers", None)
    if chunk is not None:
        chunk = _int(section, "chunk_layers", None, 1)
    offload = section.get("offload", defaults.offload)
    if not isinstance(offload, bool):
        raise ParamError(f"sparsity.offload must be true or false, got {offload!r}")
    options = section.get("options", None) or {}
    if not isinstance(options, dict):
        raise ParamError(f"sparsity.options must be a mapping of loss options, got {options!r}")
    return SparsityConfig(
        method=method, mask_type=mask_type, targets=check_targets(section.get("targets", list(defaults.targets))),
        towers=TOWER_CHOICES[towers], loss=loss, batch_size=_int(section, "batch_size", defaults.batch_size, 1),
        num_grads=_int(section, "num_grads", defaults.num_grads, 1), damp=float(damp),
        fisher_block_size=_int(section, "fisher_block_size", defaults.fisher_block_size, 1),
        fisher_dtype=fisher_dtype, chunk_layers=chunk, offload=offload, options=dict(options))
