"""Adapter for open_clip CLIP models with ViT vision towers, and the loaders of ``fixture:`` and ``open_clip:`` names.

On construction every ``nn.MultiheadAttention`` of the vision and text transformer blocks is replaced by
``MultiHeadSelfAttention`` (same outputs), so head masks can hook the attention context and heads can be
sliced out physically.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

import torch
from torch import nn

from ..errors import ModelLoadError
from ..model_files import fixture_files, parse_open_clip
from .attention import MultiHeadSelfAttention
from .base import (MAX_CONTEXT, MAX_IMAGE_SIDE, MAX_VOCAB, MAX_WIDTH, MODEL_FAMILIES, MODEL_SOURCES, BlockLayout,
                   ClipModel, EncoderTower, TextPooling, Tower, check_encoder_widths, check_param_budget,
                   check_preprocess_config, config_int, unique_parameters)
from .loading import UNSAFE_CHECKPOINT, first_line, quiet_root_logger, read_model_state, refused_pickle

OPEN_CLIP_LAYOUT = BlockLayout(attn="attn", mlp="mlp", fc1="c_fc", fc2="c_proj")
# text pooling rules of open_clip 3.3.0 (``text_global_pool``; ``TextTransformer`` accepts exactly these)
OPEN_CLIP_POOL_TYPES = ("argmax", "eos", "first", "last", "none")
_MISSING = object()


def _text_tower_parts(module: nn.Module):
    """(transformer, number of positions) of the text tower of a CLIP or CustomTextCLIP."""
    from open_clip.transformer import TextTransformer

    if hasattr(module, "text"):  # CustomTextCLIP
        if not isinstance(module.text, TextTransformer):
            raise ModelLoadError(
                f"text tower {type(module.text).__name__} is not supported (only open_clip's TextTransformer)"
            )
        return module.text.transformer, int(module.text.num_pos)
    return module.transformer, int(module.positional_embedding.shape[0])


def check_supported(module: nn.Module) -> None:
    """Raise ModelLoadError unless ``module`` is an open_clip CLIP with a plain ViT vision tower."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(module, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ModelLoadError(
            f"vision tower {type(visual).__name__} is not supported: only ViT vision towers (open_clip "
            "VisionTransformer) can be pruned, not ResNet/timm towers"
        )
    if hasattr(module, "text_decoder"):
        raise ModelLoadError("CoCa models are not supported (contrastive CLIP models only)")
    text_transformer, _ = _text_tower_parts(module)
    for tower_name, transformer in (("vision", visual.transformer), ("text", text_transformer)):
        for block in transformer.resblocks:
            if not isinstance(block, ResidualAttentionBlock):
                raise ModelLoadError(
                    f"{tower_name} block type {type(block).__name__} is not supported (only the default "
                    "ResidualAttentionBlock, no qk_norm/scaled-cosine/custom blocks)"
                )


def convert_attention(module: nn.Module) -> int:
    """Replace each block's ``nn.MultiheadAttention`` by ``MultiHeadSelfAttention``; returns how many."""
    from open_clip.transformer import ResidualAttentionBlock

    converted = 0
    for block in module.modules():
        if isinstance(block, ResidualAttentionBlock) and isinstance(block.attn, nn.MultiheadAttention):
            if hasattr(block, "ln_1_kv"):
                raise ModelLoadError("cross-attention blocks are not supported")
            block.attn = MultiHeadSelfAttention.from_multihead_attention(block.attn)
            converted += 1
    return converted


def _sides(value, key: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return config_int(value[0], f"{key}[0]", MAX_IMAGE_SIDE), config_int(value[1], f"{key}[1]", MAX_IMAGE_SIDE)
    side = config_int(value, key, MAX_IMAGE_SIDE)
    return side, side


def check_model_cfg(model_cfg, prefix: str = "model_cfg") -> None:
    """ModelLoadError naming the key unless every width of an open_clip ViT model config is usable.

    Zero or negative widths, head widths, patch sizes and the like would divide by zero or fail deep inside
    open_clip; widths are bounded so that building the architecture cannot exhaust memory.
    """
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if not isinstance(model_cfg, dict):
        raise ModelLoadError(f"{prefix} must be a mapping, got {type(model_cfg).__name__}")
    config_int(model_cfg.get("embed_dim"), f"{prefix}.embed_dim", MAX_WIDTH)
    parsed = {}
    for part, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        raw = model_cfg.get(part, {})
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{prefix}.{part} must be a mapping, got {type(raw).__name__}")
        try:
            parsed[part] = cls(**raw)
        except TypeError as err:
            raise ModelLoadError(f"{prefix}.{part}: {err}") from None
    vision, text = parsed["vision_cfg"], parsed["text_cfg"]
    key = f"{prefix}.vision_cfg."
    if isinstance(vision.layers, (list, tuple)) or vision.timm_model_name:
        raise ModelLoadError(f"{prefix}.vision_cfg: only ViT vision towers (open_clip VisionTransformer) can be pruned, not "
                             f"ResNet/timm towers (layers {vision.layers!r}, timm_model_name "
                             f"{vision.timm_model_name!r})")
    params = check_encoder_widths(key, width=(vision.width, "width"), heads=(vision.head_width, "head_width"),
                                  layers=(vision.layers, "layers"), mlp=(vision.mlp_ratio, "mlp_ratio"))
    image, patch = _sides(vision.image_size, f"{key}image_size"), _sides(vision.patch_size, f"{key}patch_size")
    if patch[0] > image[0] or patch[1] > image[1]:
        raise ModelLoadError(f"{key}patch_size {vision.patch_size} must not exceed image_size {vision.image_size}")
    if text.hf_model_name is None:  # a transformers text tower brings its own config
        key = f"{prefix}.text_cfg."
        params += check_encoder_widths(key, width=(text.width, "width"), heads=(text.heads, "heads"),
                                       layers=(text.layers, "layers"), mlp=(text.mlp_ratio, "mlp_ratio"))
        config_int(text.context_length, f"{key}context_length", MAX_CONTEXT)
        params += config_int(text.vocab_size, f"{key}vocab_size", MAX_VOCAB) * text.width
    check_param_budget(params, prefix)


def build_open_clip_module(model_cfg: dict, prefix: str = "model_cfg") -> nn.Module:
    """Random-initialised open_clip model from a model config (as in open_clip's model_configs/*.json).

    The config is checked first (``check_model_cfg``; ``prefix`` is its key in messages).
    """
    from open_clip.model import CLIP, CustomTextCLIP

    check_model_cfg(model_cfg, prefix)
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        raise ModelLoadError("CoCa model configs (multimodal_cfg) are not supported")
    cls = CustomTextCLIP if custom_text else CLIP
    try:
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise ModelLoadError(f"invalid open_clip model_cfg ({type(err).__name__}: {err})") from err


def make_open_clip_tokenizer(tokenizer_cfg: dict) -> Callable:
    """open_clip's bundled tokenizer for an architecture, else SimpleTokenizer with the context length."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    arch = tokenizer_cfg.get("arch")
    if arch:
        try:
            return open_clip.get_tokenizer(arch)
        except Exception as err:  # hf-tokenizer archs need the hub
            raise ModelLoadError(
                f"open_clip tokenizer for {arch!r} could not be created offline ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); pre-download it into the HF cache"
            ) from err
    return SimpleTokenizer(context_length=int(tokenizer_cfg["context_length"]))


class LazyTokenizer:
    """Builds the tokenizer on first use (loading the BPE merges takes about a second)."""

    def __init__(self, tokenizer_cfg: dict):
        self.tokenizer_cfg = dict(tokenizer_cfg)
        self._tokenizer = None

    @property
    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            self._tokenizer = make_open_clip_tokenizer(self.tokenizer_cfg)
        return self._tokenizer

    def __call__(self, texts, *args, **kwargs) -> torch.Tensor:
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):  # e.g. context_length, encode, decode
        if name.startswith("_") or name == "tokenizer_cfg":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def make_open_clip_preprocess(config: dict) -> Callable:
    from open_clip import image_transform

    return image_transform(
        config["image_size"],
        is_train=False,
        mean=tuple(config["image_mean"]),
        std=tuple(config["image_std"]),
        resize_mode=config.get("resize_mode"),
        interpolation=config.get("interpolation"),
    )


@MODEL_FAMILIES.register("open_clip")
class OpenClipModel(ClipModel):
    """``ClipModel`` over an open_clip ``CLIP`` / ``CustomTextCLIP`` with a ViT vision tower.

    ``config`` is the export config: ``{"family": "open_clip", "model_cfg": {...}, "image_size": int,
    "image_mean": [...], "image_std": [...], "interpolation", "resize_mode", "tokenizer": {"arch",
    "context_length"}}``; from it ``from_config`` rebuilds the (unpruned) architecture offline.
    """

    family = "open_clip"

    def __init__(self, module: nn.Module, name: str, config: dict, tokenizer: Callable | None = None,
                 preprocess: Callable | None = None):
        check_supported(module)
        convert_attention(module)
        self.module = module
        self.name = name
        self._config = copy.deepcopy(config)
        self._config["family"] = self.family
        self.image_size = int(config["image_size"])
        self.context_length = int(config["tokenizer"]["context_length"])
        self.tokenizer = tokenizer if tokenizer is not None else LazyTokenizer(config["tokenizer"])
        self.preprocess = preprocess if preprocess is not None else make_open_clip_preprocess(config)
        self.towers = self._make_towers()

    @classmethod
    def from_config(cls, config: dict, name: str, prefix: str = "") -> OpenClipModel:
        """Random-initialised model of the architecture described by an export config (no download).

        ModelLoadError naming the key (under ``prefix``) for a width or preprocessing value that makes no sense.
        """
        check_preprocess_config(config, prefix)
        tokenizer = config.get("tokenizer")
        if not isinstance(tokenizer, dict):
            raise ModelLoadError(f"{prefix}tokenizer must be a mapping, got {type(tokenizer).__name__}")
        config_int(tokenizer.get("context_length"), f"{prefix}tokenizer.context_length", MAX_CONTEXT)
        return cls(build_open_clip_module(config.get("model_cfg"), f"{prefix}model_cfg"), name, config)

    @classmethod
    def from_export(cls, config: dict, name: str, directory, prefix: str = "") -> OpenClipModel:
        return cls.from_config(config, name, prefix=prefix)  # the tokenizer is rebuilt from config["tokenizer"]

    def _make_towers(self) -> dict[str, Tower]:
        visual = self.module.visual
        grid = visual.grid_size
        vision_head_dim, text_head_dim = _config_head_dims(self._config["model_cfg"])
        text_transformer, text_tokens = _text_tower_parts(self.module)
        return {
            "vision": EncoderTower("vision", visual.transformer.resblocks, tokens=grid[0] * grid[1] + 1,
                                   hidden=visual.transformer.width, head_dim=vision_head_dim,
                                   layout=OPEN_CLIP_LAYOUT),
            "text": EncoderTower("text", text_transformer.resblocks, tokens=text_tokens,
                                 hidden=text_transformer.width, head_dim=text_head_dim,
                                 layout=OPEN_CLIP_LAYOUT),
        }

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.encode_text(tokens)

    def tower_param_count(self, tower: str) -> int:
        if tower == "vision":
            return sum(p.numel() for p in self.module.visual.parameters())
        if tower == "text":
            if hasattr(self.module, "text"):
                return sum(p.numel() for p in self.module.text.parameters())
            skip = {id(p) for p in self.module.visual.parameters()}
            skip.add(id(self.module.logit_scale))
            if getattr(self.module, "logit_bias", None) is not None:
                skip.add(id(self.module.logit_bias))
            return sum(p.numel() for p in self.module.parameters() if id(p) not in skip)
        raise KeyError(f"unknown tower {tower!r} (expected vision or text)")

    def _text_attribute(self, owner, name: str):
        value = getattr(owner, name, _MISSING)
        if value is _MISSING:
            raise ModelLoadError(f"{self.name}: the text tower ({type(owner).__name__}) has no {name}; mask tuning "
                                 f"cannot tell which token positions reach the text embedding")
        return value

    def text_pooling(self) -> TextPooling:
        """``CLIP``: the ``text_pool_type`` rule; ``CustomTextCLIP``: its ``TextTransformer``'s ``pool_type``;
        causal unless built with ``no_causal_mask``."""
        text = getattr(self.module, "text", None)
        if text is not None:  # CustomTextCLIP: pooling lives on its TextTransformer
            if self._text_attribute(text, "cls_emb") is not None:
                raise ModelLoadError(f"{self.name}: the text tower appends a class token (embed_cls) and pools it; "
                                     f"mask tuning does not support this text tower")
            rule, eos = self._text_attribute(text, "pool_type"), self._text_attribute(text, "eos_id")
            causal = self._text_attribute(text, "attn_mask") is not None
            pad_id = self._text_attribute(text, "pad_id") if getattr(text, "use_pad_mask", False) else None
        else:
            owner = self.module
            rule, eos = self._text_attribute(owner, "text_pool_type"), self._text_attribute(owner, "text_eos_id")
            causal, pad_id = self._text_attribute(owner, "attn_mask") is not None, None
        if rule not in OPEN_CLIP_POOL_TYPES:
            raise ModelLoadError(f"{self.name}: unknown text pooling rule {rule!r} (mask tuning knows "
                                 f"{', '.join(OPEN_CLIP_POOL_TYPES)})")
        if rule == "eos" and not isinstance(eos, int):
            raise ModelLoadError(f"{self.name}: text pooling rule 'eos' needs an integer eos id, got {eos!r}")
        return TextPooling(rule, eos, causal, pad_id)

    def tower_output(self, tower: str, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """open_clip's own ``_pool`` for the vision tower; for text, ``ln_final``, the pooling rule and the
        projection as ``CLIP.encode_text`` / ``TextTransformer.forward`` apply them."""
        if tower == "vision":
            visual = self.module.visual
            pooled, _ = visual._pool(hidden)
            return pooled @ visual.proj if visual.proj is not None else pooled
        if tower != "text":
            raise KeyError(f"unknown tower {tower!r} (expected vision or text)")
        owner = getattr(self.module, "text", self.module)  # CustomTextCLIP's TextTransformer, or CLIP itself
        pooling = self.text_pooling()  # refuses an appended class token
        x = owner.ln_final(hidden)
        positions = pooling.positions(inputs)
        pooled = x if positions is None else x[torch.arange(x.shape[0], device=x.device), positions]
        projection = owner.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.module.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise ModelLoadError("token distillation needs a ViT whose final LayerNorm acts on every token "
                                 "(no attentional pooling / final_ln_after_pool); use distill.loss=kl")
        x = visual.transformer(visual._embeds(images))
        x = visual.ln_post(x)
        return x @ visual.proj if visual.proj is not None else x

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """For the plain ``CLIP`` text tower also the positional embedding and projection, which are bare
        parameters of the top module."""
        module = self.module
        if tower == "vision":
            return unique_parameters(module.visual.parameters())
        if tower != "text":
            raise KeyError(f"unknown tower {tower!r} (expected vision or text)")
        if hasattr(module, "text"):  # CustomTextCLIP
            return unique_parameters(module.text.parameters())
        params = [p for m in (module.transformer, module.token_embedding, module.ln_final) for p in m.parameters()]
        params.append(module.positional_embedding)
        if isinstance(getattr(module, "text_projection", None), nn.Parameter):
            params.append(module.text_projection)
        elif getattr(module, "text_projection", None) is not None:
            params += list(module.text_projection.parameters())
        return unique_parameters(params)


def _config_head_dims(model_cfg: dict) -> tuple[int, int]:
    """(vision, text) head widths of the architecture; pruning never changes them."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    text = CLIPTextCfg(**model_cfg["text_cfg"])
    return vision.head_width, text.width // text.heads


# ---------------------------------------------------------------------------------------------
# loaders (models.load_model)
# ---------------------------------------------------------------------------------------------
@MODEL_SOURCES.register("fixture")
def load_fixture(spec: str, device: str) -> OpenClipModel:
    """``fixture:<name>``: ``<fixtures root>/<name>/config.json`` (open_clip model_cfg and preprocessing) with
    ``model.safetensors`` (a plain open_clip state dict, or one of the adapted model)."""
    config_path, weights_path = fixture_files(spec)
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path}: invalid JSON ({first_line(err)})") from err
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
    state = read_model_state(weights_path, module)
    # plain open_clip state dicts hold attn.in_proj_weight; one saved from an adapted model holds attn.q_proj.*
    adapted = any(".attn.q_proj." in key for key in state)
    model = OpenClipModel(module.eval(), f"fixture:{spec}", config) if adapted else None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"{weights_path}: weights do not match {config_path.name} "
                             f"({first_line(err)})") from err
    if model is None:
        model = OpenClipModel(module.eval(), f"fixture:{spec}", config)
    return model.to(device)


@MODEL_SOURCES.register("open_clip")
def load_open_clip(spec: str, device: str) -> OpenClipModel:
    """``open_clip:<arch>/<pretrained tag or local file>`` through open_clip's own factory (cache first)."""
    import open_clip

    arch, pretrained, _ = parse_open_clip(spec)
    try:
        with quiet_root_logger():
            module, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device="cpu",
                                                                          weights_only=True)
    except Exception as err:  # download / cache / checkpoint errors of many kinds
        if refused_pickle(err):
            raise ModelLoadError(f"open_clip:{spec}: the checkpoint {UNSAFE_CHECKPOINT}") from err
        raise ModelLoadError(
            f"open_clip:{spec}: could not load the weights offline ({first_line(err)}); pre-download them into "
            f"the HF/open_clip cache (HF_HOME) on a machine with internet, or pass a local checkpoint file "
            f"as open_clip:{arch}/<path>"
        ) from err
    return wrap_open_clip(module, f"open_clip:{spec}", open_clip.get_model_config(arch), arch,
                          preprocess=preprocess).to(device)


def wrap_open_clip(module, name: str, model_cfg: dict, tokenizer_arch: str | None = None,
                   preprocess=None) -> OpenClipModel:
    """Wrap an already built open_clip ``CLIP`` (its attention is converted in place) as ``load_model`` does.

    ``model_cfg``: the open_clip model config it was built from; ``tokenizer_arch``: the architecture whose
    tokenizer to use (None: open_clip's bundled BPE tokenizer with the config's context length).
    """
    import open_clip

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
