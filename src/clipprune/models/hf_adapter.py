"""Adapter for transformers ``CLIPModel``, and the loader of ``hf:`` names.

``hf:`` models read their tokenizer and image preprocessing from the same folder as the weights. A present
but unreadable tokenizer file or preprocessor_config.json is a ModelLoadError naming the file; a missing
preprocessor_config.json (or key) takes CLIP's defaults and a missing tokenizer leaves the model without
one (text encoding then fails), each logged once as an ``AssumedDefaultsWarning``.

``CLIPAttention`` already calls ``out_proj`` on the per-head context and reshapes with ``-1`` heads, so
head hooks and head slicing work on the original modules; nothing is replaced on load.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ModelLoadError
from ..model_files import hf_directory
from .base import (MAX_CONTEXT, MAX_IMAGE_SIDE, MAX_VOCAB, MAX_WIDTH, MODEL_FAMILIES, MODEL_SOURCES, BlockLayout,
                   ClipModel, EncoderTower, TextPooling, Tower, check_encoder_widths, check_param_budget,
                   check_preprocess_config, config_int, unique_parameters)
from .loading import (UNSAFE_CHECKPOINT, finite_number, first_line, read_json_file, refused_pickle,
                      warn_assumed)

HF_LAYOUT = BlockLayout(attn="self_attn", mlp="mlp", fc1="fc1", fc2="fc2")
TOKENIZER_DIR = "tokenizer"  # where an exported model keeps its tokenizer files

# OpenAI CLIP normalisation, the default of CLIPImageProcessor
DEFAULT_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class HFTokenizer:
    """Wraps a transformers CLIP tokenizer: list of strings -> LongTensor (n, context_length)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                 return_tensors="pt")
        return encoded["input_ids"]

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(str(path))


# writes OpenAI's CLIP vocabulary (bundled with open_clip) next to a saved CLIPModel: the way out offline
WRITE_TOKENIZER_COMMAND = "python -m clipprune.models.hf_tokenizer_files <dir>"


class MissingTokenizer:
    """Placeholder when no tokenizer files were found: fails with a one-line reason when used."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, texts) -> torch.Tensor:
        raise ModelLoadError(self.reason)


def make_preprocess(config: dict) -> Callable:
    from open_clip import image_transform

    # CLIPImageProcessor: resize the shortest side (bicubic), centre-crop, normalise; image_transform matches
    return image_transform(config["image_size"], is_train=False, mean=tuple(config["image_mean"]),
                           std=tuple(config["image_std"]), interpolation="bicubic")


@MODEL_FAMILIES.register("hf")
class HFClipModel(ClipModel):
    """``ClipModel`` over a transformers ``CLIPModel``.

    ``config`` is the export config: ``{"family": "hf", "clip_config": CLIPConfig.to_dict(),
    "image_size": int, "image_mean": [...], "image_std": [...], "context_length": int}``.
    """

    family = "hf"

    def __init__(self, module: nn.Module, name: str, config: dict | None = None,
                 tokenizer: Callable | None = None, preprocess: Callable | None = None):
        from transformers import CLIPModel

        if not isinstance(module, CLIPModel):
            raise ModelLoadError(f"{name}: expected a transformers CLIPModel, got {type(module).__name__}")
        self.module = module
        self.name = name
        if config is None:
            config = default_export_config(module)
        self._config = copy.deepcopy(config)
        self._config["family"] = self.family
        self.image_size = int(self._config["image_size"])
        self.context_length = int(self._config["context_length"])
        self.tokenizer = tokenizer if tokenizer is not None else MissingTokenizer(
            f"{name}: no tokenizer files were found for this model; save a CLIPTokenizer next to the weights "
            "(tokenizer.save_pretrained), load the model by its hub id with the tokenizer cached, or, for a "
            f"model with OpenAI's CLIP vocabulary, run `{WRITE_TOKENIZER_COMMAND}`"
        )
        self.preprocess = preprocess if preprocess is not None else make_preprocess(self._config)
        self.towers = self._make_towers()

    @classmethod
    def from_config(cls, config: dict, name: str, tokenizer: Callable | None = None,
                    prefix: str = "") -> "HFClipModel":
        """Random-initialised model of the architecture described by an export config (no download).

        ModelLoadError naming the key (under ``prefix``) for a width or preprocessing value that makes no sense.
        """
        from transformers import CLIPConfig, CLIPModel

        check_preprocess_config(config, prefix)
        config_int(config.get("context_length"), f"{prefix}context_length", MAX_CONTEXT)
        check_clip_config(config.get("clip_config"), f"{prefix}clip_config")
        try:
            module = CLIPModel(CLIPConfig.from_dict(copy.deepcopy(config["clip_config"])))
        except Exception as err:  # TypeError, ValueError, transformers' own validation errors
            detail = " ".join(str(err).split())[:200]
            raise ModelLoadError(f"{name}: invalid CLIPConfig ({type(err).__name__}: {detail})") from None
        return cls(module.eval(), name, config, tokenizer=tokenizer)

    @classmethod
    def from_export(cls, config: dict, name: str, directory, prefix: str = "") -> "HFClipModel":
        """Also reads the tokenizer ``save_side_files`` wrote (a model exported without one has none)."""
        tokenizer = None
        tok_dir = Path(directory) / TOKENIZER_DIR
        if tok_dir.is_dir():
            from transformers import CLIPTokenizerFast

            try:
                tokenizer = HFTokenizer(CLIPTokenizerFast.from_pretrained(str(tok_dir)),
                                        int(config["context_length"]))
            except Exception as err:
                raise ModelLoadError(f"{tok_dir}: tokenizer files are unreadable ({err})") from err
        return cls.from_config(config, name, tokenizer=tokenizer, prefix=prefix)

    def save_side_files(self, directory) -> None:
        saver = getattr(self.tokenizer, "save_pretrained", None)
        if saver is not None:
            saver(Path(directory) / TOKENIZER_DIR)

    def _make_towers(self) -> dict[str, Tower]:
        vision_cfg = self.module.config.vision_config
        text_cfg = self.module.config.text_config
        grid = vision_cfg.image_size // vision_cfg.patch_size
        return {
            "vision": EncoderTower("vision", self.module.vision_model.encoder.layers, tokens=grid * grid + 1,
                                   hidden=vision_cfg.hidden_size,
                                   head_dim=vision_cfg.hidden_size // vision_cfg.num_attention_heads,
                                   layout=HF_LAYOUT),
            "text": EncoderTower("text", self.module.text_model.encoder.layers,
                                 tokens=int(self._config["context_length"]), hidden=text_cfg.hidden_size,
                                 head_dim=text_cfg.hidden_size // text_cfg.num_attention_heads,
                                 layout=HF_LAYOUT),
        }

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module.get_image_features(pixel_values=images)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.module.get_text_features(input_ids=tokens)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def tower_param_count(self, tower: str) -> int:
        if tower == "vision":
            parts = (self.module.vision_model, self.module.visual_projection)
        elif tower == "text":
            parts = (self.module.text_model, self.module.text_projection)
        else:
            raise KeyError(f"unknown tower {tower!r} (expected vision or text)")
        return sum(p.numel() for part in parts for p in part.parameters())

    def text_pooling(self) -> TextPooling:
        """transformers 5 ``CLIPTextTransformer``: always causal; pools at the first ``eos_token_id``, or at the
        argmax token when the config keeps the legacy id 2."""
        eos = getattr(self.module.text_model, "eos_token_id", None)
        if isinstance(eos, bool) or not isinstance(eos, int):
            raise ModelLoadError(f"{self.name}: text_config.eos_token_id must be one integer (the token the text "
                                 f"embedding is pooled at), got {eos!r}")
        return TextPooling("argmax" if eos == 2 else "eos", eos, causal=True)

    def tower_output(self, tower: str, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``CLIPVisionTransformer``: ``post_layernorm`` of the CLS token; ``CLIPTextTransformer``:
        ``final_layer_norm`` read at the pooled position; then the family's projection."""
        if tower == "vision":
            return self.module.visual_projection(self.module.vision_model.post_layernorm(hidden[:, 0]))
        if tower != "text":
            raise KeyError(f"unknown tower {tower!r} (expected vision or text)")
        x = self.module.text_model.final_layer_norm(hidden)
        positions = self.text_pooling().positions(inputs)
        return self.module.text_projection(x[torch.arange(x.shape[0], device=x.device), positions])

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        vision = self.module.vision_model
        hidden = vision(pixel_values=images).last_hidden_state
        return self.module.visual_projection(vision.post_layernorm(hidden))

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        if tower not in ("vision", "text"):
            raise KeyError(f"unknown tower {tower!r} (expected vision or text)")
        parts = ((self.module.vision_model, self.module.visual_projection) if tower == "vision"
                 else (self.module.text_model, self.module.text_projection))
        return unique_parameters(p for part in parts for p in part.parameters())


def check_clip_config(clip_config, prefix: str = "clip_config") -> None:
    """ModelLoadError naming the key unless every width of a ``CLIPConfig`` dict is usable.

    Checked on the dict, before transformers sees it (its own checks divide by the head count); a key the
    dict lacks takes transformers' default.
    """
    from types import SimpleNamespace

    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    if not isinstance(clip_config, dict):
        raise ModelLoadError(f"{prefix} must be a mapping, got {type(clip_config).__name__}")
    parts = {}
    for part, cls in (("vision_config", CLIPVisionConfig), ("text_config", CLIPTextConfig)):
        raw = clip_config.get(part) or {}
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{prefix}.{part} must be a mapping, got {type(raw).__name__}")
        parts[part] = SimpleNamespace(**{**cls().to_dict(), **raw})
    clip_config = SimpleNamespace(projection_dim=clip_config.get("projection_dim", CLIPConfig().projection_dim),
                                  **parts)
    params = config_int(clip_config.projection_dim, f"{prefix}.projection_dim", MAX_WIDTH)
    for part in ("vision_config", "text_config"):
        cfg, key = getattr(clip_config, part), f"{prefix}.{part}."
        params += check_encoder_widths(key, width=(cfg.hidden_size, "hidden_size"),
                                       heads=(cfg.num_attention_heads, "num_attention_heads"),
                                       layers=(cfg.num_hidden_layers, "num_hidden_layers"),
                                       mlp=(cfg.intermediate_size, "intermediate_size"))
    vision, key = clip_config.vision_config, f"{prefix}.vision_config."
    image = config_int(vision.image_size, f"{key}image_size", MAX_IMAGE_SIDE)
    config_int(vision.patch_size, f"{key}patch_size", image)
    config_int(vision.num_channels, f"{key}num_channels", 3, lower=3)
    text, key = clip_config.text_config, f"{prefix}.text_config."
    config_int(text.max_position_embeddings, f"{key}max_position_embeddings", MAX_CONTEXT)
    params += config_int(text.vocab_size, f"{key}vocab_size", MAX_VOCAB) * text.hidden_size
    check_param_budget(params, prefix)


def default_export_config(module: nn.Module, image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
                          image_std: Sequence[float] = DEFAULT_IMAGE_STD, image_size: int | None = None) -> dict:
    """Export config of a CLIPModel: its CLIPConfig plus preprocessing and text context length."""
    import json

    config = module.config
    # JSON-normalised (int dict keys become strings, tuples lists) so it equals what export reads back
    clip_config = json.loads(config.to_json_string(use_diff=False))
    clip_config.pop("_name_or_path", None)
    return {
        "family": "hf",
        "clip_config": clip_config,
        "image_size": int(image_size or config.vision_config.image_size),
        "image_mean": [float(v) for v in image_mean],
        "image_std": [float(v) for v in image_std],
        "context_length": int(config.text_config.max_position_embeddings),
    }


# ---------------------------------------------------------------------------------------------
# loader (models.load_model)
# ---------------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


@MODEL_SOURCES.register("hf")
def load_hf(spec: str, device: str) -> HFClipModel:
    """``hf:<repo id or local dir>``: a transformers ``CLIPModel`` with the tokenizer and image preprocessing
    saved next to its weights (a missing tokenizer or preprocessor_config.json: ``AssumedDefaultsWarning``)."""
    from transformers import CLIPModel

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
            if refused_pickle(err):
                raise ModelLoadError(f"hf:{spec}: the weights file {UNSAFE_CHECKPOINT}") from err
            errors.append(first_line(err))
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


TOKENIZER_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf_tokenizer(directory: Path, name: str, context_length: int):
    """The CLIP tokenizer saved in ``directory``: tokenizer.json, or vocab.json + merges.txt.

    Present but unreadable: ModelLoadError naming the file. None at all: no tokenizer (logged); the model
    loads and vision-only stages work, encoding text fails with a one-line reason (MissingTokenizer).
    """
    from transformers import CLIPTokenizer  # transformers 5: one class, backed by the tokenizers library

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
        warn_assumed(f"{name}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt) in {directory}; "
                      f"the model has no tokenizer and encoding text will fail (for a model with OpenAI's CLIP "
                      f"vocabulary: {WRITE_TOKENIZER_COMMAND.replace('<dir>', str(directory))})")
        return None
    for filename in TOKENIZER_JSON_FILES:
        if (directory / filename).is_file():
            read_json_file(directory / filename, "tokenizer file")
    try:
        return HFTokenizer(CLIPTokenizer.from_pretrained(str(directory), local_files_only=True), context_length)
    except Exception as err:  # the files parse as JSON but do not make a tokenizer
        raise ModelLoadError(f"{main}: unreadable tokenizer file ({first_line(err)[:200]})") from err


def _image_processor_settings(directory: Path, name: str, module) -> tuple[list, list, int]:
    """(mean, std, crop size) from ``directory``/preprocessor_config.json.

    A missing file or key takes CLIPImageProcessor's default (OpenAI CLIP mean / std; the crop is the vision
    config's image_size), logged once; a present but unreadable or malformed file is a ModelLoadError.
    """
    path = directory / "preprocessor_config.json"
    defaults = {"image_mean": list(DEFAULT_IMAGE_MEAN), "image_std": list(DEFAULT_IMAGE_STD),
                "crop_size": int(module.config.vision_config.image_size)}
    if not path.is_file():
        warn_assumed(f"{name}: no preprocessor_config.json in {directory}; assuming CLIP's image preprocessing "
                      f"(image_mean {defaults['image_mean']}, image_std {defaults['image_std']}, crop_size "
                      f"{defaults['crop_size']} from the vision config)")
        return defaults["image_mean"], defaults["image_std"], defaults["crop_size"]
    cfg = read_json_file(path, "image preprocessor config")
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    absent = [key for key in defaults if key not in cfg]
    if absent:
        warn_assumed(f"{name}: {path} has no {', '.join(absent)}; assuming "
                      + ", ".join(f"{key} {defaults[key]}" for key in absent))
    values = {**defaults, **{key: cfg[key] for key in defaults if key in cfg}}
    for key in ("image_mean", "image_std"):
        value = values[key]
        if not (isinstance(value, list) and len(value) == 3 and all(finite_number(v) for v in value)) or \
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
