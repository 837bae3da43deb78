"""One interface over CLIP families (open_clip, transformers) for each tower.

Everything family-specific lives in the family's adapter module (``open_clip_adapter``, ``hf_adapter``),
registered in ``MODEL_FAMILIES`` under its ``family`` name: how its blocks are reached, how it is rebuilt from
an export config, where its text embedding is pooled, its feature taps and per-tower parameters, and the
loaders of its model names, registered in ``MODEL_SOURCES`` under their prefix (``hf`` for ``hf:<dir>``).
Adding a family is one adapter module that subclasses ``ClipModel`` and registers both (plus, in
``clipprune.model_files``, which local files its names read: that module must not import torch).

A ``ClipModel`` wraps the underlying ``nn.Module`` and exposes, per tower ("vision", "text"), the list of
transformer blocks with their shapes and two hook points per block:

* ``context_module(i)``: a module whose forward *input* is the attention context (batch, tokens,
  heads*head_dim), before the output projection. A head mask scales each head's slice of that input.
* ``mlp_out_module(i)``: the second MLP linear; a neuron mask scales its input.

Either may be ``None`` for a block whose attention / MLP sub-block was pruned away entirely.
"""
from __future__ import annotations

import copy as _copy
import math
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ModelLoadError
from ..registry import Registry

TOWERS = ("vision", "text")

# adapter classes by family name (the ``family`` of an export config); models/__init__ imports the adapters
MODEL_FAMILIES = Registry("base.family", "model family")
# loaders by model-name prefix: ``loader(spec, device) -> ClipModel`` for ``<prefix>:<spec>`` (models.load_model)
MODEL_SOURCES = Registry("model", "model name prefix")


@dataclass(frozen=True)
class TextPooling:
    """Where a text tower reads its embedding from, and which positions can reach it.

    ``rule``: ``argmax`` (the highest token id: CLIP's EOT), ``eos`` (the first ``eos_id``), ``first``,
    ``last``, or ``none`` (no pooling: every position is an output). ``causal``: position ``t`` sees only
    positions ≤ ``t``. ``pad_id``: a bidirectional tower that masks padding keys (open_clip ``use_pad_mask``).
    """

    rule: str
    eos_id: int | None
    causal: bool
    pad_id: int | None = None

    def positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """``[B]`` position each row's embedding is read from, as the model computes it; ``None`` for ``none``."""
        if self.rule == "argmax":
            return tokens.argmax(dim=-1)
        if self.rule == "eos":  # the first eos (position 0 when a row has none, as the models do)
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.rule == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if self.rule == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        if self.rule == "none":
            return None
        raise ModelLoadError(f"unknown text pooling rule {self.rule!r}")


@dataclass(frozen=True)
class BlockView:
    """Shapes of one transformer block as it is now (after pruning widths may differ per block)."""

    index: int
    num_heads: int  # heads currently present (0 = attention sub-block dropped)
    head_dim: int
    hidden: int  # residual width d
    ffn_dim: int  # MLP neurons currently present (0 = MLP sub-block dropped)
    tokens: int  # sequence length s used by the MAC model

    def as_dict(self) -> dict:
        return asdict(self)


class Tower:
    """One encoder tower. Subclasses fill in how to reach a block's hook points."""

    name: str
    tokens: int

    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def block_view(self, i: int) -> BlockView:
        raise NotImplementedError

    def block_views(self) -> list[BlockView]:
        return [self.block_view(i) for i in range(len(self.blocks()))]

    def context_module(self, i: int) -> nn.Module | None:
        raise NotImplementedError

    def mlp_out_module(self, i: int) -> nn.Linear | None:
        raise NotImplementedError


@dataclass(frozen=True)
class BlockLayout:
    """Attribute names inside one family's transformer block (both families share q/k/v/out_proj names)."""

    attn: str  # attention sub-module of the block ("attn" / "self_attn")
    mlp: str  # MLP sub-module of the block
    fc1: str  # first MLP linear ("c_fc" / "fc1")
    fc2: str  # second MLP linear ("c_proj" / "fc2")


class EncoderTower(Tower):
    """A tower made of pre-norm transformer blocks laid out as ``layout`` says.

    Works for the adapted open_clip blocks (``MultiHeadSelfAttention``) and for transformers'
    ``CLIPEncoderLayer``; dropped sub-blocks are ``DroppedAttention`` / ``DroppedMLP`` (``attention.py``).
    """

    def __init__(self, name: str, blocks: nn.ModuleList, tokens: int, hidden: int, head_dim: int,
                 layout: BlockLayout):
        self.name = name
        self._blocks = blocks
        self.tokens = tokens
        self.hidden = hidden
        self.head_dim = head_dim
        self.layout = layout

    def blocks(self) -> Sequence[nn.Module]:
        return list(self._blocks)

    def attention(self, i: int) -> nn.Module:
        return getattr(self._blocks[i], self.layout.attn)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self._blocks[i], self.layout.mlp)

    def set_attention(self, i: int, module: nn.Module) -> None:
        setattr(self._blocks[i], self.layout.attn, module)

    def set_mlp(self, i: int, module: nn.Module) -> None:
        setattr(self._blocks[i], self.layout.mlp, module)

    def attention_dropped(self, i: int) -> bool:
        return not hasattr(self.attention(i), "out_proj")

    def mlp_dropped(self, i: int) -> bool:
        return not hasattr(self.mlp(i), self.layout.fc2)

    def fc1(self, i: int) -> nn.Linear | None:
        return None if self.mlp_dropped(i) else getattr(self.mlp(i), self.layout.fc1)

    def context_module(self, i: int) -> nn.Module | None:
        return None if self.attention_dropped(i) else self.attention(i).out_proj

    def mlp_out_module(self, i: int) -> nn.Linear | None:
        return None if self.mlp_dropped(i) else getattr(self.mlp(i), self.layout.fc2)

    def num_heads(self, i: int) -> int:
        out_proj = self.context_module(i)
        return 0 if out_proj is None else out_proj.in_features // self.head_dim

    def ffn_dim(self, i: int) -> int:
        fc2 = self.mlp_out_module(i)
        return 0 if fc2 is None else fc2.in_features

    def head_index(self, i: int) -> list[int]:
        """For each present head of block ``i``, its index in the original (unpruned) block."""
        if self.attention_dropped(i):
            return []
        index = getattr(self.attention(i), "head_index", None)
        return list(range(self.num_heads(i))) if index is None else [int(h) for h in index]

    def block_view(self, i: int) -> BlockView:
        return BlockView(index=i, num_heads=self.num_heads(i), head_dim=self.head_dim, hidden=self.hidden,
                         ffn_dim=self.ffn_dim(i), tokens=self.tokens)


class ClipModel:
    """Adapter interface; see ``open_clip_adapter.OpenClipModel`` and ``hf_adapter.HFClipModel``."""

    family: str  # "open_clip" | "hf"
    name: str  # the model name it was loaded from
    module: nn.Module  # the underlying model (its parameters are the model's parameters)
    towers: dict[str, Tower]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # list of strings -> LongTensor (n, context_length)
    preprocess: Callable  # PIL.Image -> FloatTensor (3, H, W), the eval transform
    image_size: int
    context_length: int  # token ids per text (the tokenizer's output length)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalised), shape (n, embed_dim)."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings (not normalised), shape (n, embed_dim)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine similarities, exp(learned log-scale), as a 0-dim tensor with grad.

        Both families keep the learned log-scale as ``module.logit_scale``.
        """
        return self.module.logit_scale.exp()

    def export_config(self) -> dict:
        """JSON-serialisable description from which the (unpruned) architecture can be rebuilt offline.

        Adapters keep it in ``self._config`` (set when they are built).
        """
        return _copy.deepcopy(self._config)

    # conveniences shared by both families -------------------------------------------------------
    def eval(self) -> "ClipModel":
        self.module.eval()
        return self

    def to(self, *args, **kwargs) -> "ClipModel":
        self.module.to(*args, **kwargs)
        return self

    def parameters(self):
        return self.module.parameters()

    def _make_towers(self) -> dict[str, Tower]:
        """Build the tower views over ``self.module`` (called again after ``copy``)."""
        raise NotImplementedError

    def copy(self) -> "ClipModel":
        """A new adapter over a deep copy of the module (tokenizer and preprocess are shared).

        Mask hooks registered by ``masks.apply_masks`` on the source are not carried over.
        """
        new = _copy.copy(self)
        new.module = _copy.deepcopy(self.module)
        for sub in new.module.modules():
            for key, hook in list(sub._forward_pre_hooks.items()):
                if getattr(hook, "clipprune_mask_hook", False):
                    del sub._forward_pre_hooks[key]
        new.towers = new._make_towers()
        return new

    def tower_param_count(self, tower: str) -> int:
        """Parameters of one tower's encoder (embeddings and projection included)."""
        raise NotImplementedError

    # family-specific pieces used by tuning, export and distillation ------------------------------
    @classmethod
    def from_export(cls, config: dict, name: str, directory: Path, prefix: str = "") -> "ClipModel":
        """The random-initialised dense model an export ``config`` describes, with the side files that
        ``save_side_files`` wrote to ``directory`` (ModelLoadError naming the key under ``prefix``)."""
        raise NotImplementedError

    def save_side_files(self, directory: Path) -> None:
        """Write what an exported model needs besides weights and config (e.g. tokenizer files); default none."""

    def text_pooling(self) -> TextPooling:
        """Where the text embedding is read from, taken from the modules that apply it (ModelLoadError if the
        tower pools in a way mask tuning cannot follow)."""
        raise NotImplementedError

    def tower_output(self, tower: str, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The tower's embedding from its last block's output ``hidden`` (``[B, T, D]``, batch first) and the
        tower's ``inputs`` (the token ids pick the pooled position): the part of ``encode_image`` /
        ``encode_text`` after the blocks (final norm, pooling, projection). Lets a search rerun only the blocks
        a candidate changes (``search/adaptive.py``)."""
        raise NotImplementedError

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Projected final token features ``(batch, tokens, embed_dim)`` of the vision tower; row 0 equals
        ``encode_image`` (CLS pooling). ModelLoadError for a vision tower that pools otherwise.

        Taken after the projection so that token distillation (``distill.loss: mse``) covers the embedding
        zero-shot uses and the projection gets gradient (without it weight decay would shrink the projection)."""
        raise NotImplementedError

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """Every parameter of one tower (encoder, embeddings, final norm, projection), each once."""
        raise NotImplementedError


# ------------------------------------------------------------------ widths read back from config files
# Upper bounds for the widths a config file may ask for: far above any CLIP (ViT-bigG: width 1664, 48
# layers, MLP 8192; vocabularies ~250k), low enough that building the module cannot exhaust memory.
MAX_WIDTH = 2**16          # residual / embedding / head widths, MLP widths
MAX_LAYERS = 1024
MAX_VOCAB = 2**21
MAX_IMAGE_SIDE = 8192      # = the side of data.images.MAX_IMAGE_PIXELS
MAX_CONTEXT = 2**16
MAX_MLP_RATIO = 64
MAX_PARAMS = 2**32         # of the whole architecture (ViT-bigG-14 has 2.5e9): 16 GiB in float32


def check_encoder_widths(key: str, *, width: tuple, heads: tuple, layers: tuple, mlp: tuple) -> int:
    """Check one transformer tower's widths; returns its parameter count (roughly: the blocks only).

    Each argument is ``(value, field name in the config)``; ModelLoadError names ``key`` + the field.
    ``heads`` is a head count, or a head width when its field is ``head_width`` (open_clip's vision tower);
    ``mlp`` is the MLP width, or a ratio of the width when its field is ``mlp_ratio``.
    """
    w = config_int(width[0], f"{key}{width[1]}", MAX_WIDTH)
    config_divides(w, config_int(heads[0], f"{key}{heads[1]}", w), f"{key}{heads[1]}")
    n = config_int(layers[0], f"{key}{layers[1]}", MAX_LAYERS)
    if mlp[1] == "mlp_ratio":
        neurons = int(w * config_number(mlp[0], f"{key}{mlp[1]}", MAX_MLP_RATIO))
        if neurons < 1:
            raise ModelLoadError(f"{key}{mlp[1]} must give an MLP of at least one neuron, got {mlp[0]!r} x {w}")
    else:
        neurons = config_int(mlp[0], f"{key}{mlp[1]}", MAX_WIDTH * MAX_MLP_RATIO)
    return n * (4 * w * w + 2 * w * neurons)


def check_param_budget(params: int, key: str) -> None:
    if params > MAX_PARAMS:
        raise ModelLoadError(f"{key} describes about {params:.3g} parameters, more than the {MAX_PARAMS:.3g} "
                             f"any supported CLIP needs (MAX_PARAMS, clipprune/models/base.py)")


def config_int(value, key: str, upper: int, lower: int = 1) -> int:
    """``value`` if it is an integer in ``[lower, upper]``, else ModelLoadError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lower <= value <= upper:
        raise ModelLoadError(f"{key} must be an integer in [{lower}, {upper}], got {value!r}")
    return value


def config_number(value, key: str, upper: float) -> float:
    """``value`` if it is a finite number in ``(0, upper]``, else ModelLoadError naming ``key``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= upper  # NaN fails
    if not ok:
        raise ModelLoadError(f"{key} must be a number in (0, {upper:g}], got {value!r}")
    return float(value)


def config_divides(width: int, heads: int, key: str) -> None:
    if width % heads:
        raise ModelLoadError(f"{key} must divide the width {width} evenly, got {heads}")


def check_preprocess_config(config: dict, prefix: str = "") -> None:
    """ModelLoadError naming the key unless image size, mean and std of an export config make sense."""
    config_int(config.get("image_size"), f"{prefix}image_size", MAX_IMAGE_SIDE)
    for key in ("image_mean", "image_std"):
        values = config.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                and (key == "image_mean" or all(v > 0 for v in values))):
            what = "positive " if key == "image_std" else ""
            raise ModelLoadError(f"{prefix}{key} must be a list of 3 finite {what}numbers (one per RGB "
                                 f"channel), got {values!r}")


def unique_parameters(params) -> list[nn.Parameter]:
    """``params`` without repeats (tied or shared parameters), in first-seen order."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
