"""Layer-input capture and block-level helpers for mask tuning.

Mask tuning works one transformer block at a time. Rather than re-running the whole encoder up to block
``i`` for every layer (quadratic in depth), the inputs of block 0 are captured once per batch with
``models.blocks.capture_block_input`` (with the arguments the encoder passes to its blocks), and the hidden
states are then propagated block by block by calling each block directly. Only the current layer's inputs are kept (one ``[tokens, hidden]`` tensor per sample for the
teacher and one for the student).

Inside a block, forward hooks read the tensors the least-squares problems need:

* the per-head attention context: the input of ``out_proj`` (``Tower.context_module``),
* the post-attention residual stream: the input of the block's second LayerNorm,
* the MLP activations: the input of the second MLP linear (``Tower.mlp_out_module``).

Both CLIP families share the pre-norm block ``x + ls_1(attn(ln_1(x)))`` then ``h + ls_2(mlp(ln_2(h)))``
(open_clip's LayerScale ``ls_*`` is usually ``Identity``; transformers has none). ``BlockParts`` names
the pieces; ``check_block_structure`` verifies that identity numerically on real activations so that an
unsupported block fails loudly instead of being tuned wrongly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..distributed import current, shard_batches
from ..errors import DataError, ModelLoadError, ParamError
from ..models.base import ClipModel, EncoderTower
from ..models.blocks import BlockCall, StopForward

# second LayerNorm of a block, by family: open_clip ResidualAttentionBlock / transformers CLIPEncoderLayer
_NORM2_NAMES = ("ln_2", "layer_norm2")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class TowerBatch:
    """One batch of one tower's inputs: images ``[B, 3, H, W]`` or token ids ``[B, T]``.

    ``valid`` is ``[B, T]`` bool (text only): the token positions that can influence the pooled output.
    """

    inputs: torch.Tensor
    valid: torch.Tensor | None = None


def _as_token_ids(model: ClipModel, captions) -> torch.Tensor:
    if isinstance(captions, torch.Tensor):
        if captions.dim() != 2 or captions.is_floating_point():
            raise DataError(f"calibration captions must be token ids [batch, context] (integer), "
                            f"got a {captions.dtype} tensor of shape {list(captions.shape)}")
        return captions.long()
    if isinstance(captions, str) or not isinstance(captions, Sequence) or not all(isinstance(c, str) for c in captions):
        raise DataError("calibration captions must be a list of strings or a tensor of token ids")
    return model.tokenizer(list(captions))


def _split_inputs(inputs: tuple, batch_size: int) -> Iterator[tuple]:
    images, captions = inputs
    total = len(images) if images is not None else len(captions)
    for start in range(0, total, batch_size):
        yield (None if images is None else images[start:start + batch_size],
               None if captions is None else captions[start:start + batch_size])


def _is_single_input_pair(value) -> bool:
    """``(images, captions)`` of whole-dataset tensors, as opposed to an iterable of such batches."""
    if not isinstance(value, tuple) or len(value) != 2:
        return False
    images, captions = value
    return (images is None or isinstance(images, torch.Tensor)) and (
        captions is None or isinstance(captions, torch.Tensor)
        or (isinstance(captions, list) and all(isinstance(c, str) for c in captions)))


def iter_tower_batches(model: ClipModel, loader_or_inputs, towers: Sequence[str],
                       batch_size: int = 32) -> Iterator[dict[str, TowerBatch]]:
    """Yield ``{tower: TowerBatch}`` for each calibration batch.

    ``loader_or_inputs`` is an iterable of ``(images, captions)`` batches (the scoring loaders' format;
    captions as a list of strings or token ids; either side may be ``None`` when its tower is not needed),
    or a single ``(images, captions)`` pair of whole-set tensors, split into ``batch_size`` chunks.
    """
    device = next(model.parameters()).device
    source: Iterable = (_split_inputs(loader_or_inputs, batch_size)
                        if _is_single_input_pair(loader_or_inputs) else loader_or_inputs)
    try:
        iterator = iter(source)
    except TypeError:
        raise DataError(f"calibration data must be an iterable of (images, captions) batches, "
                        f"got {type(loader_or_inputs).__name__}") from None
    # data parallel: batch i is captured by rank i mod N (one process: every batch)
    for index, batch in shard_batches(source, current()) if current().world > 1 else enumerate(iterator):
        if isinstance(batch, Mapping):
            batch = (batch.get("images"), batch.get("captions", batch.get("tokens")))
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"calibration batch {index} must be an (images, captions) pair, "
                            f"got {type(batch).__name__}")
        images, captions = batch[0], batch[1]
        out = {}
        for tower in towers:
            if tower == "vision":
                if not isinstance(images, torch.Tensor) or images.dim() != 4:
                    raise DataError(f"calibration batch {index}: tuning the vision tower needs images "
                                    f"[batch, 3, H, W], got {type(images).__name__}")
                out[tower] = TowerBatch(images.to(device, torch.float32))
            elif tower == "text":
                if captions is None:
                    raise DataError(f"calibration batch {index}: tuning the text tower needs captions")
                tokens = _as_token_ids(model, captions).to(device)
                out[tower] = TowerBatch(tokens, text_valid_positions(model, tokens))
            else:
                raise ParamError(f"tune.towers: unknown tower {tower!r} (expected vision or text)")
        yield out


def text_valid_positions(model: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the token positions that can influence the text embedding.

    In a causal tower those at or before the pooled position (padding after the EOT never reaches it;
    fitting it would let padding dominate short captions). Every position is valid where the rule says so:
    ``none`` (every position is an output), ``last`` in a causal tower (the last position sees all), and any
    rule in a bidirectional tower, except padding keys that the tower masks out.
    """
    pooling = model.text_pooling()
    everything = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    pooled = pooling.positions(tokens)
    if pooled is None:
        return everything
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    if pooling.causal:
        return positions <= pooled[:, None]
    if pooling.pad_id is None:
        return everything
    # masked padding keys reach no other position; a pad position matters only as the pooled one itself
    return (tokens != pooling.pad_id) | (positions == pooled[:, None])


def token_rows(hidden: torch.Tensor, valid: torch.Tensor | None, seq_first: bool) -> torch.Tensor:
    """Flatten ``[B, T, D]`` (or ``[T, B, D]``) to ``[tokens, D]``, keeping only ``valid`` positions."""
    if valid is None:
        return hidden.reshape(-1, hidden.shape[-1])
    if seq_first:
        valid = valid.t()
    return hidden[valid]


# ---------------------------------------------------------------------------------------------
# block parts
# ---------------------------------------------------------------------------------------------
@dataclass
class BlockParts:
    """The pieces of one pre-norm block that the least-squares problems are written in."""

    block: nn.Module
    attention: nn.Module
    out_proj: nn.Linear | None  # None: attention sub-block dropped
    norm2: nn.Module  # its input is the post-attention residual stream
    mlp: nn.Module
    fc2: nn.Linear | None  # None: MLP sub-block dropped
    gamma1: torch.Tensor | None  # LayerScale of the attention branch (None = identity)
    gamma2: torch.Tensor | None

    def attention_columns(self, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
        """``out_proj`` columns of the given heads with LayerScale folded in: ``[hidden, len(heads)*head_dim]``."""
        cols = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
        weight = self.out_proj.weight[:, cols]
        return weight if self.gamma1 is None else self.gamma1[:, None] * weight

    def attention_bias(self) -> torch.Tensor | None:
        bias = self.out_proj.bias
        if bias is None or self.gamma1 is None:
            return bias
        return self.gamma1 * bias

    def mlp_columns(self, neurons: torch.Tensor) -> torch.Tensor:
        """Second-linear columns of the given neurons with LayerScale folded in: ``[hidden, len(neurons)]``."""
        weight = self.fc2.weight[:, neurons]
        return weight if self.gamma2 is None else self.gamma2[:, None] * weight

    def mlp_bias(self) -> torch.Tensor | None:
        bias = self.fc2.bias
        if bias is None or self.gamma2 is None:
            return bias
        return self.gamma2 * bias


def _layer_scale(block: nn.Module, name: str) -> torch.Tensor | None:
    module = getattr(block, name, None)
    if module is None or isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, torch.Tensor) and not getattr(module, "inplace", False):
        return gamma.detach()
    raise ModelLoadError(f"block attribute {name} ({type(module).__name__}) is not supported by mask tuning "
                         "(only Identity or a non-inplace LayerScale)")


def block_parts(tower: EncoderTower, layer: int) -> BlockParts:
    """Name the parts of block ``layer`` of ``tower`` (ModelLoadError for an unsupported block)."""
    block = tower.blocks()[layer]
    norm2 = next((getattr(block, n) for n in _NORM2_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    if norm2 is None:
        raise ModelLoadError(f"{tower.name} block {layer} ({type(block).__name__}) has no second LayerNorm "
                             f"({' / '.join(_NORM2_NAMES)}); mask tuning supports pre-norm CLIP blocks only")
    return BlockParts(
        block=block,
        attention=tower.attention(layer),
        out_proj=tower.context_module(layer),
        norm2=norm2,
        mlp=tower.mlp(layer),
        fc2=tower.mlp_out_module(layer),
        gamma1=_layer_scale(block, "ls_1"),
        gamma2=_layer_scale(block, "ls_2"),
    )


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_input(module: nn.Module, store: dict, key: str, stop: bool = False):
    """Record ``module``'s first forward input under ``store[key]``.

    The hook is prepended, so it sees the input *before* any mask hook rescales it (the raw head
    context / MLP activations). With ``stop=True`` it then ends the forward (``StopForward``).
    """

    def hook(mod, args):
        store[key] = args[0].detach()
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook, prepend=True)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def record_output(module: nn.Module, store: dict, key: str):
    """Record ``module``'s forward output (first element of a tuple output) under ``store[key]``."""

    def hook(mod, args, output):
        store[key] = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_until_stop(call: BlockCall, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """Run a block; returns its output, or ``None`` when a recording hook stopped it early."""
    try:
        return call.run(block, hidden)
    except StopForward:
        return None


@contextlib.contextmanager
def record_structure(parts: BlockParts, store: dict):
    """Record what ``verify_block_structure`` needs during one ordinary run of the block."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(record_output(parts.attention, store, "attn"))
        stack.enter_context(record_input(parts.norm2, store, "h"))
        stack.enter_context(record_output(parts.norm2, store, "h_norm"))
        stack.enter_context(record_input(parts.mlp, store, "mlp_in"))
        stack.enter_context(record_output(parts.mlp, store, "mlp"))
        yield store


def verify_block_structure(parts: BlockParts, hidden: torch.Tensor, seen: Mapping[str, torch.Tensor],
                           out: torch.Tensor, where: str, rtol: float = 1e-3) -> None:
    """Check ``h = x + ls_1(attn)``, ``mlp input = ln_2(h)`` and ``y = h + ls_2(mlp)`` on real activations.

    ``seen`` comes from ``record_structure`` around the run that mapped ``hidden`` to ``out``.
    Raises ModelLoadError: tuning such a block with the pre-norm formulas would be silently wrong.
    """
    if not {"attn", "h", "h_norm", "mlp_in", "mlp"} <= set(seen):
        raise ModelLoadError(f"{where}: block did not run its attention, second LayerNorm and MLP in order; "
                             "mask tuning supports pre-norm CLIP blocks only")
    attn = seen["attn"] if parts.gamma1 is None else seen["attn"] * parts.gamma1
    mlp = seen["mlp"] if parts.gamma2 is None else seen["mlp"] * parts.gamma2
    checks = (("post-attention stream", seen["h"], hidden + attn), ("MLP input", seen["mlp_in"], seen["h_norm"]),
              ("block output", out, seen["h"] + mlp))
    for name, got, want in checks:
        scale = want.abs().max().clamp_min(1e-6)
        if got.shape != want.shape or float((got - want).abs().max()) > rtol * float(scale):
            raise ModelLoadError(f"{where}: the {name} is not what the pre-norm residual block mask tuning "
                                 "assumes (x + attn(ln_1 x), then h + mlp(ln_2 h)); this block type is not supported")


def mlp_branch(parts: BlockParts, post_attention: torch.Tensor) -> torch.Tensor:
    """The block output from its post-attention stream: ``h + ls_2(mlp(ln_2(h)))`` (the MLP half only)."""
    out = parts.mlp(parts.norm2(post_attention))
    if parts.gamma2 is not None:
        out = out * parts.gamma2
    return post_attention + out
