"""Reading params.yaml (YAML 1.2, as DVC writes it); ``clipprune.config`` validates what it holds."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ParamError


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
