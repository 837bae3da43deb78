"""``load_model(name)``: resolve a model name to a ``ClipModel``.

Names: ``fixture:<name>`` (data/fixtures/<name>/, the embedded default), ``open_clip:<arch>/<pretrained
tag or local file>``, ``hf:<repo id or local dir>``, ``pruned:<dir>`` (a directory written by
``export.export_pruned``). Weights are looked up in local caches first; a name that cannot be loaded
fails with a one-line ModelLoadError saying how to make the weights available. ``resolve_model_files(name)``
(from ``clipprune.model_files``) says which local files or folders a name reads, without loading them.

``hf:`` models read their tokenizer and image preprocessing from the same folder as the weights. A present
but unreadable tokenizer file or preprocessor_config.json is a ModelLoadError naming the file; a missing
preprocessor_config.json (or key) takes CLIP's defaults and a missing tokenizer leaves the model without
one (text encoding then fails), each logged once as an ``AssumedDefaultsWarning``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle  # only for its exception type: nothing is unpickled
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError
from ..io import FLOATING, read_safetensors
from ..model_files import (check_model_files, fixture_files, fixtures_root, hf_directory, parse_open_clip,
                           resolve_model_files, split_name)
from .base import ClipModel

__all__ = ["LOADERS", "AssumedDefaultsWarning", "check_model_files", "fixtures_root", "load_model",
           "resolve_model_files", "wrap_open_clip"]


class AssumedDefaultsWarning(UserWarning):
    """A model folder lacks an optional file; the documented default stands in for it (logged once)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
UNSAFE_CHECKPOINT = ("holds pickled Python objects, which are never unpickled here (torch.load weights_only=True "
                     "refused it); convert it to safetensors on a machine where its source is trusted")


def _first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()  # torch's messages carry terminal bold codes
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _refused_pickle(err: BaseException) -> bool:
    """True if ``err`` (or an exception it wraps) is torch's weights-only loader refusing a pickle."""
    while err is not None:
        if isinstance(err, pickle.UnpicklingError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _read_safetensors(path: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load a state dict for ``module``, floating tensors cast to float32 (fixtures may be stored in float16).

    A tensor for a floating parameter or buffer must be floating (``load_state_dict`` would cast integers
    silently); names the module lacks (a state dict of the adapted model) must be floating too.
    """
    dtypes = {key: FLOATING if value.is_floating_point() else value.dtype
              for key, value in module.state_dict().items()}
    state, _ = read_safetensors(path, error=ModelLoadError, dtypes={**dtypes, "*": FLOATING})
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_fixture(spec: str, device: str) -> ClipModel:
    from .base import MAX_CONTEXT, check_preprocess_config, config_int
    from .open_clip_adapter import OpenClipModel, build_open_clip_module, check_model_cfg

    config_path, weights_path = fixture_files(spec)
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path}: invalid JSON ({_first_line(err)})") from err
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("family", "open_clip") != "open_clip":
        raise ModelLoadError(f"{config_path}: family must be 'open_clip', got {raw.get('family')!r}")
    for key in ("model_cfg", "image_mean", "image_std"):
        if key not in raw:
            raise ModelLoadError(f"{config_path}: missing key {key!r}")
    model_cfg = raw["model_cfg"]
    try:
        check_model_cfg(model_cfg)
        image_size = model_cfg["vision_cfg"]["image_size"]
        context_length = config_int(model_cfg["text_cfg"]["context_length"], "model_cfg.text_cfg.context_length",
                                    MAX_CONTEXT)
    except (KeyError, TypeError) as err:
        raise ModelLoadError(f"{config_path}: model_cfg needs vision_cfg.image_size and "
                             f"text_cfg.context_length") from err
    except ModelLoadError as err:
        raise ModelLoadError(f"{config_path}: {err}") from None
    config = {
        "family": "open_clip",
        "model_cfg": model_cfg,
        "image_size": image_size if isinstance(image_size, int) else None,  # a [h, w] pair: refused below
        "image_mean": raw["image_mean"],
        "image_std": raw["image_std"],
        "interpolation": raw.get("interpolation"),
        "resize_mode": raw.get("resize_mode"),
        "tokenizer": {"arch": None, "context_length": context_length},
    }
    try:
        check_preprocess_config(config)
    except ModelLoadError as err:
        raise ModelLoadError(f"{config_path}: {err}") from None
    config["image_mean"], config["image_std"] = list(config["image_mean"]), list(config["image_std"])
    try:
        module = build_open_clip_module(model_cfg)
    except ModelLoadError as err:
        raise ModelLoadError(f"{config_path}: {err}") from err
    state = _read_safetensors(weights_path, module)
    # plain open_clip state dicts hold attn.in_proj_weight; one saved from an adapted model holds attn.q_proj.*
    adapted = any(".attn.q_proj." in key for key in state)
    model = OpenClipModel(module.eval(), f"fixture:{spec}", config) if adapted else None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"{weights_path}: weights do not match {config_path.name} "
                             f"({_first_line(err)})") from err
    if model is None:
        model = OpenClipModel(module.eval(), f"fixture:{spec}", config)
    return model.to(device)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_root_logger():
    """Drop ERROR records logged on the root logger while the block runs (warnings still show).

    open_clip reports a failed weight download with logging.error() before raising; the caller turns the
    exception into one ModelLoadError line, so the log record would only print the same failure twice.
    """
    logging.root.addFilter(_below_error)
    try:
        yield
    finally:
        logging.root.removeFilter(_below_error)


def _load_open_clip(spec: str, device: str) -> ClipModel:
    import open_clip

    from .open_clip_adapter import OpenClipModel

    arch, pretrained, _ = parse_open_clip(spec)
    try:
        with _quiet_root_logger():
            module, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device="cpu",
                                                                          weights_only=True)
    except Exception as err:  # download / cache / checkpoint errors of many kinds
        if _refused_pickle(err):
            raise ModelLoadError(f"open_clip:{spec}: the checkpoint {UNSAFE_CHECKPOINT}") from err
        raise ModelLoadError(
            f"open_clip:{spec}: could not load the weights offline ({_first_line(err)}); pre-download them into "
            f"the HF/open_clip cache (HF_HOME) on a machine with internet, or pass a local checkpoint file "
            f"as open_clip:{arch}/<path>"
        ) from err
    return wrap_open_clip(module, f"open_clip:{spec}", open_clip.get_model_config(arch), arch,
                          preprocess=preprocess).to(device)


def wrap_open_clip(module, name: str, model_cfg: dict, tokenizer_arch: str | None = None,
                   preprocess=None) -> "OpenClipModel":
    """Wrap an already built open_clip ``CLIP`` (its attention is converted in place) as ``load_model`` does.

    ``model_cfg``: the open_clip model config it was built from; ``tokenizer_arch``: the architecture whose
    tokenizer to use (None: open_clip's bundled BPE tokenizer with the config's context length).
    """
    import open_clip

    from .open_clip_adapter import OpenClipModel

    pp = dict(getattr(module.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", module.visual.image_size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    config = {
        "family": "open_clip",
        "model_cfg": model_cfg,
        "image_size": int(size),
        "image_mean": list(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "image_std": list(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": pp.get("interpolation"),
        "resize_mode": pp.get("resize_mode"),
        "tokenizer": {"arch": tokenizer_arch,
                      "context_length": int(model_cfg["text_cfg"].get("context_length", 77))},
    }
    return OpenClipModel(module.float().eval(), name, config, preprocess=preprocess)


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def _load_hf(spec: str, device: str) -> ClipModel:
    from transformers import CLIPModel

    from .hf_adapter import HFClipModel, HFTokenizer, default_export_config

    if not spec:
        hf_directory(spec)  # raises the usage error
    local = Path(spec).is_dir()
    # cache first (no network); a download is only tried when not offline and the name is not a local dir
    attempts = [True] if local or _hub_offline() else [True, False]
    module, errors = None, []
    for local_only in attempts:
        try:
            module = CLIPModel.from_pretrained(spec, local_files_only=local_only, dtype=torch.float32)
            break
        except Exception as err:  # OSError for missing files, ValueError for wrong model types, ...
            if _refused_pickle(err):
                raise ModelLoadError(f"hf:{spec}: the weights file {UNSAFE_CHECKPOINT}") from err
            errors.append(_first_line(err))
    if module is None:
        where = "the local directory" if local else "the HF cache" + ("" if len(attempts) == 1 else " and the hub")
        raise ModelLoadError(
            f"hf:{spec}: CLIPModel weights not found in {where} ({errors[-1][:200]}); pre-download them with "
            f"`huggingface-cli download {spec}` on a machine with internet (HF_HOME cache), or pass a local "
            f"directory saved with save_pretrained as hf:<dir>"
        )
    module = module.float().eval()
    directory = hf_directory(spec)  # the folder the weights came from: tokenizer and preprocessing live there
    context_length = int(module.config.text_config.max_position_embeddings)
    tokenizer = _hf_tokenizer(directory, f"hf:{spec}", context_length)
    mean, std, size = _image_processor_settings(directory, f"hf:{spec}", module)
    config = default_export_config(module, mean, std, size)
    return HFClipModel(module, f"hf:{spec}", config, tokenizer=tokenizer).to(device)


def _warn_assumed(message: str) -> None:
    warnings.warn(message, AssumedDefaultsWarning, stacklevel=3)  # once per message (Python's default filter)


def _read_json_file(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable {what} ({_first_line(err)})") from err


TOKENIZER_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf_tokenizer(directory: Path, name: str, context_length: int):
    """The CLIP tokenizer saved in ``directory``: tokenizer.json, or vocab.json + merges.txt.

    Present but unreadable: ModelLoadError naming the file. None at all: no tokenizer (logged); the model
    loads and vision-only stages work, encoding text fails with a one-line reason (MissingTokenizer).
    """
    from transformers import CLIPTokenizer  # transformers 5: one class, backed by the tokenizers library

    from .hf_adapter import WRITE_TOKENIZER_COMMAND, HFTokenizer

    fast, vocab, merges = directory / "tokenizer.json", directory / "vocab.json", directory / "merges.txt"
    if fast.is_file():
        main = fast
    elif vocab.is_file() or merges.is_file():
        if not (vocab.is_file() and merges.is_file()):
            present, absent = (vocab, merges) if vocab.is_file() else (merges, vocab)
            raise ModelLoadError(f"{absent} not found next to {present.name} (a CLIP BPE tokenizer needs both, "
                                 f"or a tokenizer.json)")
        main = vocab
    else:
        _warn_assumed(f"{name}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt) in {directory}; "
                      f"the model has no tokenizer and encoding text will fail (for a model with OpenAI's CLIP "
                      f"vocabulary: {WRITE_TOKENIZER_COMMAND.replace('<dir>', str(directory))})")
        return None
    for filename in TOKENIZER_JSON_FILES:
        if (directory / filename).is_file():
            _read_json_file(directory / filename, "tokenizer file")
    try:
        return HFTokenizer(CLIPTokenizer.from_pretrained(str(directory), local_files_only=True), context_length)
    except Exception as err:  # the files parse as JSON but do not make a tokenizer
        raise ModelLoadError(f"{main}: unreadable tokenizer file ({_first_line(err)[:200]})") from err


def _image_processor_settings(directory: Path, name: str, module) -> tuple[list, list, int]:
    """(mean, std, crop size) from ``directory``/preprocessor_config.json.

    A missing file or key takes CLIPImageProcessor's default (OpenAI CLIP mean / std; the crop is the vision
    config's image_size), logged once; a present but unreadable or malformed file is a ModelLoadError.
    """
    from .hf_adapter import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    path = directory / "preprocessor_config.json"
    defaults = {"image_mean": list(DEFAULT_IMAGE_MEAN), "image_std": list(DEFAULT_IMAGE_STD),
                "crop_size": int(module.config.vision_config.image_size)}
    if not path.is_file():
        _warn_assumed(f"{name}: no preprocessor_config.json in {directory}; assuming CLIP's image preprocessing "
                      f"(image_mean {defaults['image_mean']}, image_std {defaults['image_std']}, crop_size "
                      f"{defaults['crop_size']} from the vision config)")
        return defaults["image_mean"], defaults["image_std"], defaults["crop_size"]
    cfg = _read_json_file(path, "image preprocessor config")
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    absent = [key for key in defaults if key not in cfg]
    if absent:
        _warn_assumed(f"{name}: {path} has no {', '.join(absent)}; assuming "
                      + ", ".join(f"{key} {defaults[key]}" for key in absent))
    values = {**defaults, **{key: cfg[key] for key in defaults if key in cfg}}
    for key in ("image_mean", "image_std"):
        value = values[key]
        if not (isinstance(value, list) and len(value) == 3 and all(_finite_number(v) for v in value)) or \
                (key == "image_std" and min(value) <= 0):
            raise ModelLoadError(f"{path}: {key} must be a list of 3 {'positive ' if key == 'image_std' else ''}"
                                 f"numbers, got {value!r}")
    crop = values["crop_size"]
    if isinstance(crop, dict):
        sides = {crop.get("height"), crop.get("width")} - {None}
        crop = sides.pop() if len(sides) == 1 else None
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
        raise ModelLoadError(f"{path}: crop_size must be a positive integer or a square "
                             f"{{height, width}}, got {values['crop_size']!r}")
    return [float(v) for v in values["image_mean"]], [float(v) for v in values["image_std"]], crop


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_pruned(spec: str, device: str) -> ClipModel:
    from ..models.pruned import load_pruned

    return load_pruned(spec, device=device)


LOADERS: dict[str, Callable[[str, str], ClipModel]] = {
    "fixture": _load_fixture,
    "open_clip": _load_open_clip,
    "hf": _load_hf,
    "pruned": _load_pruned,
}


def load_model(name: str, device: str | torch.device = "cpu") -> ClipModel:
    """Load a CLIP model by name (see module docstring) in eval mode, float32, on ``device``."""
    prefix, spec = split_name(name)
    return LOADERS[prefix](spec, str(device))
