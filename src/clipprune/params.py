"""Reading and validating params.yaml values with one-line errors that name the key."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable


from .errors import ParamError

_MISSING = object()


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    """Load params.yaml as a dict (ParamError naming the file if it is missing or not a mapping).

    Read as YAML 1.2, as DVC reads and writes it: `dvc exp run -S sparsity.mask_type=2:4` writes an unquoted
    ``2:4``, which a YAML 1.1 reader (PyYAML) would turn into the base-60 number 124, and ``yes`` / ``no``
    stay strings instead of becoming booleans.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: params file not found")
    try:
        params = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid YAML"
        raise ParamError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of stage sections at top level")
    return params


def get(params: dict, key: str, default: Any = _MISSING) -> Any:
    """Look up a dotted key ("search.constraint"); ParamError if absent and no default is given."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not _MISSING:
                return default
            raise ParamError(f"{key} is required in params.yaml but missing")
        node = node[part]
    return node


def _type_name(value: Any) -> str:
    return type(value).__name__


def get_int(params: dict, key: str, *, min_value: int | None = None, max_value: int | None = None,
            default: Any = _MISSING) -> int:
    value = get(params, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(f"{key} must be an integer, got {value!r} ({_type_name(value)})")
    if min_value is not None and value < min_value:
        raise ParamError(f"{key} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ParamError(f"{key} must be <= {max_value}, got {value}")
    return value


def get_float(params: dict, key: str, *, low: float | None = None, high: float | None = None,
              low_open: bool = False, high_open: bool = False, default: Any = _MISSING) -> float:
    """A finite number, optionally within [low, high] (ends open when *_open is set)."""
    value = get(params, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(f"{key} must be a finite number, got {value!r} ({_type_name(value)})")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ParamError(f"{key} must be in {lo}{low if low is not None else '-inf'}, "
                         f"{high if high is not None else 'inf'}{hi}, got {value}")
    return float(value)


def get_bool(params: dict, key: str, default: Any = _MISSING) -> bool:
    value = get(params, key, default)
    if not isinstance(value, bool):
        raise ParamError(f"{key} must be true or false, got {value!r}")
    return value


def get_str(params: dict, key: str, *, choices: Iterable[str] | None = None, default: Any = _MISSING) -> str:
    value = get(params, key, default)
    if not isinstance(value, str) or not value:
        raise ParamError(f"{key} must be a non-empty string, got {value!r}")
    if choices is not None:
        choices = list(choices)
        if value not in choices:
            raise ParamError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value
