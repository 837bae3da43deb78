"""A tower's transformer blocks called one at a time, as its encoder calls them.

``capture_block_input`` runs a tower up to its first block and records that block's hidden input together
with the exact positional / keyword arguments the encoder passes to its blocks (attention masks,
``is_causal`` ...); ``BlockCall.run`` then calls any block of the tower with a new hidden state. With the
adapter's ``tower_output`` (final norm, pooling, projection) a caller can rerun only the blocks that change:
least-squares tuning (``tuning/lsq.py``) propagates block by block, the adaptive search replays the blocks
after the one it searches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .base import ClipModel


class StopForward(Exception):
    """Raised by a capture hook to end a forward early once the needed tensor is recorded."""


@dataclass
class BlockCall:
    """How the encoder calls its blocks for one batch: the hidden state and the other arguments.

    ``hidden`` is laid out as the blocks see it; ``seq_first`` says whether that is ``[T, B, D]``.
    """

    args: tuple
    kwargs: dict
    hidden_arg: int | str  # position in args, or keyword name, of the hidden state
    seq_first: bool = False

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.hidden_arg, int):
            args[self.hidden_arg] = hidden
        else:
            kwargs[self.hidden_arg] = hidden
        out = block(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _run_tower(model: ClipModel, tower: str, inputs: torch.Tensor):
    return model.encode_image(inputs) if tower == "vision" else model.encode_text(inputs)


@torch.no_grad()
def capture_block_input(model: ClipModel, tower: str, inputs: torch.Tensor) -> tuple[torch.Tensor, BlockCall]:
    """Run the tower on ``inputs`` (images or token ids) up to its first block; return that block's hidden input
    and its call arguments."""
    block = model.towers[tower].blocks()[0]
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        _run_tower(model, tower, inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise ModelLoadError(f"{model.name}: the {tower} tower never called its first block")
    args, kwargs = seen["args"], dict(seen["kwargs"])
    if args and isinstance(args[0], torch.Tensor):
        hidden, call = args[0], BlockCall(tuple(None if i == 0 else a for i, a in enumerate(args)), kwargs, 0)
    else:
        name = next((k for k in ("q_x", "hidden_states", "x") if isinstance(kwargs.get(k), torch.Tensor)), None)
        if name is None:
            raise ModelLoadError(f"{model.name}: cannot find the hidden state among the {tower} block arguments")
        hidden = kwargs.pop(name)
        call = BlockCall(tuple(args), {**kwargs, name: None}, name)
    batch_size = inputs.shape[0]
    call.seq_first = hidden.shape[0] != batch_size and hidden.shape[1] == batch_size
    return hidden.detach(), call


def run_blocks(call: BlockCall, blocks, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` through ``blocks`` in order, each called as the encoder calls it (``call``)."""
    for block in blocks:
        hidden = call.run(block, hidden)
    return hidden


def batch_first(call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """A block's hidden state as ``[B, T, D]`` (``tower_output`` takes that layout)."""
    return hidden.transpose(0, 1) if call.seq_first else hidden
