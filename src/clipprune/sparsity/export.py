"""Compact storage of sparse weights: a packed bitmask and the nonzero values per tensor.

Directory layout (``save_sparse``)::

    out_dir/model.safetensors   dense tensors as they are; each sparse tensor ``K`` as ``K.__mask__`` (uint8,
                                ``np.packbits`` of "bit pattern is not +0.0", row-major, little bit order)
                                and ``K.__values__`` (the stored values in row-major order)
    out_dir/config.json         {"format", "format_version", "base": <dense export config>,
                                 "sparse": {K: {"shape": [...], "dtype": "float32", "nonzeros": int}}, ...}
                                (+ "towers": the per-layer widths, ``models.pruned.pruned_layout``, when the
                                model was structurally pruned first: weight sparsity stacked on a pruned export)

A weight is left out only when its bits are those of +0.0, so ``-0.0`` and NaN survive and the loader
rebuilds every tensor bit for bit. Per weight the cost is 1 bit plus the value of each kept weight: an N:M
index code (log2 M bits per kept weight) gives the same 1 bit per weight at 2:4, so one format serves all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from clipprune.errors import ClipPruneError, ModelLoadError
from clipprune.io import FLOATING, atomic_dir, read_safetensors, safetensors_bytes, save_safetensors
from clipprune.models.base import ClipModel

FORMAT = "clipprune-sparse"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MASK_SUFFIX = ".__mask__"
VALUES_SUFFIX = ".__values__"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """Bool mask of entries whose bit pattern is not all zeros (i.e. not +0.0)."""
    return tensor.reshape(-1).view(_INT_VIEW[tensor.element_size()]) != 0


def pack_sparse(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed bitmask uint8, stored values)`` of a floating tensor (see module docstring)."""
    tensor = tensor.detach().to("cpu").contiguous()
    stored = _stored(tensor)
    bits = np.packbits(stored.numpy(), bitorder="little")
    return torch.from_numpy(bits), tensor.reshape(-1)[stored].clone()


def unpack_sparse(bits: torch.Tensor, values: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_sparse`; ValueError when the parts do not fit ``shape``."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"shape {shape} is not a list of non-negative integers")
    numel = int(np.prod(shape)) if len(shape) else 1
    if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"bitmask holds {bits.numel()} bytes, expected {(numel + 7) // 8}")
    stored = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel, bitorder="little").astype(bool))
    if int(stored.sum()) != values.numel() or values.dtype != dtype:
        raise ValueError(f"{values.numel()} {values.dtype} values for {int(stored.sum())} set bits ({dtype})")
    out = torch.zeros(numel, dtype=dtype)
    out[stored] = values
    return out.reshape(tuple(shape))


def compact_tensors(state: Mapping[str, torch.Tensor], sparse_keys: Iterable[str]) -> tuple[dict, dict]:
    """(tensors to write, ``sparse`` config entries): the keys in ``sparse_keys`` packed, the rest as they are."""
    sparse_keys = set(sparse_keys)
    missing = sorted(sparse_keys - set(state))
    if missing:
        raise ClipPruneError(f"sparse export: no tensor named {missing[0]!r} in the model")
    tensors, sparse = {}, {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if key in sparse_keys and value.is_floating_point():
            bits, values = pack_sparse(value)
            tensors[key + MASK_SUFFIX], tensors[key + VALUES_SUFFIX] = bits, values
            sparse[key] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                           "nonzeros": int(values.numel())}
        else:
            tensors[key] = value
    return tensors, sparse


def expand_tensors(tensors: Mapping[str, torch.Tensor], sparse: Mapping[str, dict], where: str) -> dict:
    """Inverse of :func:`compact_tensors` (ClipPruneError naming ``where`` on a malformed entry)."""
    state = {k: v for k, v in tensors.items() if not k.endswith((MASK_SUFFIX, VALUES_SUFFIX))}
    for key, spec in sparse.items():
        try:
            bits, values = tensors[key + MASK_SUFFIX], tensors[key + VALUES_SUFFIX]
            state[key] = unpack_sparse(bits, values, spec["shape"], getattr(torch, spec["dtype"]))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ClipPruneError(f"{where}: sparse tensor {key} is malformed ({err})") from err
    return state


def save_sparse(model: ClipModel, sparse_keys: Iterable[str], out_dir: str | os.PathLike,
                extra: Mapping | None = None) -> Path:
    """Write ``model`` with the state-dict tensors ``sparse_keys`` stored compactly (atomic directory)."""
    state = model.module.state_dict()
    tensors, sparse = compact_tensors(state, sparse_keys)
    from clipprune.models.pruned import has_dense_layout, pruned_layout

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": model.family, "source": model.name,
              "base": model.export_config(), "sparse": sparse, **dict(extra or {})}
    if not has_dense_layout(model):  # a structurally pruned model: its widths, as export_pruned stores them
        config["towers"] = pruned_layout(model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_sparse(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ClipModel:
    """Rebuild the dense-shaped model written by :func:`save_sparse` (offline), eval mode, on ``device``."""
    from clipprune.models.prune import prune_in_place
    from clipprune.models.pruned import build_dense, masks_for_layout, state_dtypes

    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelLoadError(f"{path} not found (expected a directory written by save_sparse)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ClipPruneError(f"{config_path}: invalid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT \
            or config.get("format_version") != FORMAT_VERSION:
        raise ClipPruneError(f"{config_path}: expected format {FORMAT} version {FORMAT_VERSION}")
    if not isinstance(config.get("base"), dict) or not isinstance(config.get("sparse"), dict):
        raise ClipPruneError(f"{config_path}: missing or malformed 'base' / 'sparse'")
    model = build_dense(config["base"], f"sparse:{out_dir}", out_dir)
    if "towers" in config:  # weight sparsity on a structurally pruned model
        if not isinstance(config["towers"], dict):
            raise ClipPruneError(f"{config_path}: malformed 'towers'")
        prune_in_place(model, masks_for_layout(model, config["towers"], config_path))
    tensors, _ = read_safetensors(weights_path, error=ClipPruneError, dtypes={
        **state_dtypes(model), f"*{MASK_SUFFIX}": torch.uint8, f"*{VALUES_SUFFIX}": FLOATING})
    state = expand_tensors(tensors, config["sparse"], str(weights_path))
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])[:300]
        raise ClipPruneError(f"{weights_path}: weights do not match {CONFIG_NAME} ({detail})") from err
    return model.eval().to(device)


def dense_size_bytes(model: ClipModel) -> int:
    """Bytes of the model's full state dict in the same safetensors container (the dense reference)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.module.state_dict().items()}
    return len(safetensors_bytes(state))


def read_target(path: str | os.PathLike, name: str) -> tuple[dict, dict]:
    """(``{layer: weight}`` of one target, the file's metadata) from the sparse_prune stage's output."""
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"{path}: not found (run the sparse_prune stage)")
    prefix = f"{name}/"
    tensors, raw_meta = read_safetensors(path, error=ClipPruneError, unreadable="not a readable sparse_prune output",
                                         dtypes={f"*{MASK_SUFFIX}": torch.uint8, "*": FLOATING},
                                         keys=lambda key: key.startswith(prefix))
    tensors = {key[len(prefix):]: tensor for key, tensor in tensors.items()}
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except json.JSONDecodeError as err:
        raise ClipPruneError(f"{path}: not a readable sparse_prune output (metadata: {err})") from None
    targets, shapes, method = meta.get("targets"), meta.get("shapes"), meta.get("meta")
    state_keys = method.get("state_keys") if isinstance(method, dict) else None
    if not (isinstance(targets, list) and isinstance(shapes, dict) and isinstance(state_keys, dict)
            and set(shapes) <= set(state_keys)):
        raise ClipPruneError(f"{path}: metadata needs 'targets' (a list), 'shapes' and 'meta.state_keys' "
                             f"(mappings over the same layers); rerun sparse_prune")
    if name not in targets:
        raise ClipPruneError(f"{path}: holds targets {targets}, not {name} (rerun sparse_prune)")
    sparse = {layer: {"shape": shape, "dtype": "float32"} for layer, shape in shapes.items()}
    return expand_tensors(tensors, sparse, str(path)), meta


def check_same_model(reloaded: ClipModel, model: ClipModel, where: str) -> None:
    """ClipPruneError naming ``where`` unless every tensor of ``reloaded`` has the bits of ``model``'s."""
    original = model.module.state_dict()
    for key, value in reloaded.module.state_dict().items():
        if key not in original or not same_bits(value, original[key]):
            raise ClipPruneError(f"{where}: reloaded tensor {key} differs from the sparse model")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != +0.0 and NaN == the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
