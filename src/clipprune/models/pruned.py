"""The pruned-model format: write a physically pruned model (weights + per-layer widths), load it back offline.

Directory layout::

    out_dir/model.safetensors   state dict of the pruned model
    out_dir/config.json         {"format_version", "family", "source", "base": <dense export config>,
                                 "towers": {tower: {"layers": [{"heads", "head_index", "ffn_dim"}, ...]}}}
    out_dir/tokenizer/          (transformers models only, when the model had a tokenizer)

``load_pruned`` rebuilds the dense architecture from ``base`` with the adapter registered for its family
(``MODEL_FAMILIES``; random init, no download), prunes it to the stored widths and loads the weights strictly.
Family-specific side files (the transformers tokenizer) are the adapter's: ``save_side_files`` /
``from_export``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ClipPruneError, ModelLoadError, ParamError
from ..io import atomic_dir, read_safetensors, save_safetensors
from .base import MODEL_FAMILIES, MODEL_SOURCES, ClipModel
from .masks import validate_masks
from .prune import prune_in_place, prune_model

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def pruned_layout(model: ClipModel) -> dict:
    """Per tower, per layer: present heads (with original head ids) and MLP width."""
    return {
        name: {"layers": [
            {"heads": view.num_heads, "head_index": tower.head_index(i), "ffn_dim": view.ffn_dim}
            for i, view in enumerate(tower.block_views())
        ]}
        for name, tower in model.towers.items()
    }


def export_pruned(model: ClipModel, masks: Mapping[str, torch.Tensor] | None, out_dir: str | os.PathLike) -> Path:
    """Prune ``model`` by ``masks`` (scales folded in) and write it to ``out_dir`` atomically.

    ``masks=None`` exports the model as it is (e.g. an already pruned or distilled model).
    """
    if masks is not None:
        validate_masks(model, masks, "masks")
        pruned = prune_model(model, masks)
    else:
        pruned = model
    config = {
        "format_version": FORMAT_VERSION,
        "family": pruned.family,
        "source": pruned.name,
        "base": pruned.export_config(),
        "towers": pruned_layout(pruned),
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in pruned.module.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tmp / WEIGHTS_NAME, state, {"format": "clipprune-pruned",
                                                     "format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        pruned.save_side_files(tmp)
    return out_dir


def has_dense_layout(model: ClipModel) -> bool:
    """True when every block of ``model`` has the widths of the architecture ``export_config`` describes
    (nothing was pruned structurally); builds that architecture once (random weights, no download)."""
    dense = build_dense(model.export_config(), model.name, Path("."))
    return pruned_layout(dense) == pruned_layout(model)


def state_dtypes(model: ClipModel) -> dict[str, torch.dtype]:
    """``{state-dict key: dtype}`` of ``model``: what a weights file for it must hold (``read_safetensors``).

    ``load_state_dict`` would silently cast an integer or half tensor into a float parameter.
    """
    return {key: value.dtype for key, value in model.module.state_dict().items()}


def masks_for_layout(model: ClipModel, towers: dict, config_path: Path) -> dict[str, torch.Tensor]:
    """Binary masks over the dense ``model`` that reproduce the per-layer widths ``towers`` (a
    :func:`pruned_layout`); ClipPruneError naming ``config_path`` when they do not fit the model."""
    masks = {}
    for tower_name, spec in towers.items():
        if tower_name not in model.towers:
            raise ClipPruneError(f"{config_path}: unknown tower {tower_name!r}")
        tower = model.towers[tower_name]
        views = tower.block_views()
        layers = spec.get("layers") if isinstance(spec, dict) else None
        if not isinstance(layers, list) or len(layers) != len(views):
            raise ClipPruneError(f"{config_path}: towers.{tower_name}.layers must list {len(views)} layers")
        heads = torch.zeros(len(views), max(v.num_heads for v in views))
        neurons = torch.zeros(len(views), max(v.ffn_dim for v in views))
        for i, (layer, view) in enumerate(zip(layers, views)):
            try:
                index = [int(h) for h in layer["head_index"]]
                ffn_dim = int(layer["ffn_dim"])
                n_heads = int(layer["heads"])
            except (KeyError, TypeError, ValueError) as err:
                raise ClipPruneError(f"{config_path}: towers.{tower_name}.layers[{i}] needs heads, head_index "
                                     f"and ffn_dim") from err
            if (len(index) != n_heads or len(set(index)) != n_heads
                    or any(not 0 <= h < view.num_heads for h in index) or not 0 <= ffn_dim <= view.ffn_dim):
                raise ClipPruneError(f"{config_path}: towers.{tower_name}.layers[{i}] does not fit the base "
                                     f"architecture ({view.num_heads} heads, ffn_dim {view.ffn_dim})")
            heads[i, index] = 1.0
            neurons[i, :ffn_dim] = 1.0
        masks[f"{tower_name}.head"] = heads
        masks[f"{tower_name}.neuron"] = neurons
    return masks


def build_dense(base: dict, name: str, out_dir: Path) -> ClipModel:
    """The dense (unpruned, random-initialised) model an export config describes, by its family's adapter."""
    try:
        family = MODEL_FAMILIES.get(base.get("family"))
    except ParamError as err:
        raise ClipPruneError(f"{out_dir / CONFIG_NAME}: {err}") from None
    return family.from_export(base, name, out_dir, prefix="base.")


@MODEL_SOURCES.register("pruned")
def load_pruned(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> ClipModel:
    """Rebuild a model written by ``export_pruned`` (offline), in eval mode on ``device``."""
    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelLoadError(f"{path} not found (expected a directory written by export_pruned)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ClipPruneError(f"{config_path}: invalid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ClipPruneError(f"{config_path}: format_version must be {FORMAT_VERSION}, "
                             f"got {config.get('format_version') if isinstance(config, dict) else None!r}")
    for key in ("base", "towers"):
        if not isinstance(config.get(key), dict):
            raise ClipPruneError(f"{config_path}: missing or malformed {key!r}")
    try:
        model = build_dense(config["base"], f"pruned:{out_dir}", out_dir)
    except ModelLoadError as err:
        raise ClipPruneError(f"{config_path}: {err}") from err
    prune_in_place(model, masks_for_layout(model, config["towers"], config_path))
    expected = state_dtypes(model)
    state, _ = read_safetensors(weights_path, error=ClipPruneError,
                                dtypes={**expected, "*": tuple(set(expected.values()))})  # unknown keys: below
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise ClipPruneError(f"{weights_path}: weights do not match {CONFIG_NAME} ({detail})") from err
    return model.eval().to(device)
