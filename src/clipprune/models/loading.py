"""``load_model(name)``: resolve a model name to a ``ClipModel``.

Names: ``fixture:<name>`` (data/fixtures/<name>/, the embedded default), ``open_clip:<arch>/<pretrained
tag or local file>``, ``hf:<repo id or local dir>``, ``pruned:<dir>`` (a directory written by
``export.export_pruned``). Weights are looked up in local caches first; a name that cannot be loaded
fails with a one-line ModelLoadError saying how to make the weights available.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle  # only for its exception type: nothing is unpickled
import re
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError
from .base import ClipModel


def fixtures_root() -> Path:
    """data/fixtures of the repository (override with env CLIPPRUNE_FIXTURES)."""
    override = os.environ.get("CLIPPRUNE_FIXTURES")
    if override:
        return Path(override)
    import clipprune

    return Path(clipprune.__file__).resolve().parents[2] / "data" / "fixtures"


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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict, floating tensors cast to float32 (fixtures may be stored in float16)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_fixture(spec: str, device: str) -> ClipModel:
    from .open_clip_adapter import OpenClipModel, build_open_clip_module

    root = fixtures_root()
    directory = root / spec
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    hint = ("build it with the project's fixture script (make fixtures) or point CLIPPRUNE_FIXTURES "
            "at a directory holding <name>/config.json and <name>/model.safetensors")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelLoadError(f"fixture:{spec}: {path} not found; {hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path}: invalid JSON ({_first_line(err)})") from err
    if raw.get("family", "open_clip") != "open_clip":
        raise ModelLoadError(f"{config_path}: family must be 'open_clip', got {raw.get('family')!r}")
    for key in ("model_cfg", "image_mean", "image_std"):
        if key not in raw:
            raise ModelLoadError(f"{config_path}: missing key {key!r}")
    model_cfg = raw["model_cfg"]
    try:
        image_size = model_cfg["vision_cfg"]["image_size"]
        context_length = model_cfg["text_cfg"]["context_length"]
    except (KeyError, TypeError) as err:
        raise ModelLoadError(f"{config_path}: model_cfg needs vision_cfg.image_size and "
                             f"text_cfg.context_length") from err
    config = {
        "family": "open_clip",
        "model_cfg": model_cfg,
        "image_size": int(image_size),
        "image_mean": list(raw["image_mean"]),
        "image_std": list(raw["image_std"]),
        "interpolation": raw.get("interpolation"),
        "resize_mode": raw.get("resize_mode"),
        "tokenizer": {"arch": None, "context_length": int(context_length)},
    }
    try:
        module = build_open_clip_module(model_cfg)
    except ModelLoadError as err:
        raise ModelLoadError(f"{config_path}: {err}") from err
    state = _read_safetensors(weights_path)
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

    arch, _, pretrained = spec.partition("/")
    usage = "expected open_clip:<arch>/<pretrained tag or local checkpoint file>, e.g. open_clip:ViT-B-32/openai"
    if not arch or not pretrained:
        raise ModelLoadError(f"open_clip:{spec}: {usage}")
    if arch not in open_clip.list_models():
        raise ModelLoadError(f"open_clip:{spec}: unknown architecture {arch!r} (see open_clip.list_models()); {usage}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags and not os.path.isfile(pretrained):
        raise ModelLoadError(f"open_clip:{spec}: {pretrained!r} is neither a pretrained tag of {arch} "
                             f"({', '.join(tags) or 'none'}) nor an existing checkpoint file")
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
        raise ModelLoadError("hf:: expected hf:<repo id or local dir>, e.g. hf:openai/clip-vit-base-patch32")
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
    context_length = int(module.config.text_config.max_position_embeddings)
    tokenizer = None
    for tok_cls in _tokenizer_classes() if _has_tokenizer_files(spec) else []:
        try:
            tokenizer = HFTokenizer(tok_cls.from_pretrained(spec, local_files_only=True), context_length)
            break
        except Exception:
            continue
    mean, std, size = _image_processor_settings(spec, module)
    config = default_export_config(module, mean, std, size)
    return HFClipModel(module, f"hf:{spec}", config, tokenizer=tokenizer).to(device)


def _has_tokenizer_files(spec: str) -> bool:
    """transformers builds an empty tokenizer when none was saved; only load one whose files exist."""
    from transformers.utils import cached_file

    for filename in ("tokenizer.json", "vocab.json"):
        try:
            if cached_file(spec, filename, local_files_only=True, _raise_exceptions_for_missing_entries=False):
                return True
        except Exception:
            continue
    return False


def _tokenizer_classes():
    import transformers

    return [getattr(transformers, n) for n in ("CLIPTokenizerFast", "CLIPTokenizer") if hasattr(transformers, n)]


def _image_processor_settings(spec: str, module):
    """(mean, std, crop size) from a cached/local preprocessor_config.json, else CLIP's defaults."""
    from .hf_adapter import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    mean, std, size = DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, module.config.vision_config.image_size
    try:
        from transformers.utils import cached_file

        path = cached_file(spec, "preprocessor_config.json", local_files_only=True,
                           _raise_exceptions_for_missing_entries=False)
        if path:
            cfg = json.loads(Path(path).read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            crop = cfg.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else crop
    except Exception:
        pass  # the defaults are CLIPImageProcessor's own
    return mean, std, size


def _load_pruned(spec: str, device: str) -> ClipModel:
    from ..export import load_pruned

    return load_pruned(spec, device=device)


LOADERS: dict[str, Callable[[str, str], ClipModel]] = {
    "fixture": _load_fixture,
    "open_clip": _load_open_clip,
    "hf": _load_hf,
    "pruned": _load_pruned,
}


def load_model(name: str, device: str | torch.device = "cpu") -> ClipModel:
    """Load a CLIP model by name (see module docstring) in eval mode, float32, on ``device``."""
    prefix, sep, spec = str(name).partition(":")
    if not sep or prefix not in LOADERS:
        valid = ", ".join(f"{p}:" for p in LOADERS)
        raise ModelLoadError(f"model name {name!r} must start with one of {valid} "
                             f"(e.g. fixture:tiny_clip, hf:openai/clip-vit-base-patch32)")
    return LOADERS[prefix](spec, str(device))
