"""Attention modules that expose the per-head context to hooks, and stand-ins for dropped sub-blocks.

open_clip's ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``, whose forward hands
``out_proj.weight`` to the functional kernel: hooks on ``out_proj`` never fire and heads cannot be
sliced out. ``MultiHeadSelfAttention`` is a drop-in replacement with separate q/k/v projections and an
``out_proj`` that is really *called* on the context, so a forward-pre-hook on it sees (…, heads*head_dim).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with a variable number of heads and the call signature of ``nn.MultiheadAttention``.

    ``head_index`` (non-persistent buffer) holds, for each present head, its index in the original
    (unpruned) layer; it lets per-head attention masks built for the original head count be mapped.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        source_heads: Optional[int] = None,
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError("MultiHeadSelfAttention needs at least one head (use DroppedAttention)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.batch_first = batch_first
        self.dropout = dropout
        self.source_heads = source_heads if source_heads is not None else num_heads
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.register_buffer("head_index", torch.arange(num_heads), persistent=False)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> "MultiHeadSelfAttention":
        """Copy the weights of a self-attention ``nn.MultiheadAttention`` (same outputs)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ModelLoadError(
                "only plain self-attention nn.MultiheadAttention (no kdim/vdim, bias_k, add_zero_attn) can be "
                "converted for pruning"
            )
        d = mha.embed_dim
        has_bias = mha.in_proj_bias is not None
        new = cls(d, mha.num_heads, mha.head_dim, bias=has_bias, batch_first=mha.batch_first, dropout=mha.dropout)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for part, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[part * d:(part + 1) * d])
                if has_bias:
                    proj.bias.copy_(mha.in_proj_bias[part * d:(part + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _additive_mask(
        self,
        attn_mask: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        batch: int,
        dtype: torch.dtype,
    ) -> Optional[torch.Tensor]:
        """Combine the masks into one additive float mask broadcastable to (batch, heads, L, S)."""
        combined = None
        if attn_mask is not None:
            mask = _as_additive(attn_mask, dtype)
            if mask.dim() == 3:
                # nn.MultiheadAttention layout: (batch * heads, L, S), heads of the *original* layer
                per_sample = mask.shape[0] // batch
                mask = mask.view(batch, per_sample, *mask.shape[1:])
                if per_sample == self.num_heads:
                    pass
                elif per_sample == self.source_heads:
                    mask = mask.index_select(1, self.head_index)
                elif per_sample != 1:
                    raise ValueError(
                        f"attn_mask has {per_sample} heads per sample, layer has {self.num_heads} "
                        f"(originally {self.source_heads})"
                    )
            combined = mask
        if key_padding_mask is not None:
            pad = _as_additive(key_padding_mask, dtype)[:, None, None, :]  # (B, 1, 1, S)
            combined = pad if combined is None else combined + pad
        return combined

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Returns ``(output, None)``; attention weights are never materialised."""
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:  # (L, B, D) -> (B, L, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, _ = query.shape
        k_len = key.shape[1]
        q = self.q_proj(query).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, k_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, k_len, self.num_heads, self.head_dim).transpose(1, 2)
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, q.dtype)
        context = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        context = context.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        out = self.out_proj(context)  # the hook point: its input is the per-head context
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention semantics: bool True = not allowed; float masks are added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _first_input(args: tuple, kwargs: dict, names: tuple[str, ...]) -> torch.Tensor:
    if args:
        return args[0]
    for name in names:
        if name in kwargs and kwargs[name] is not None:
            return kwargs[name]
    raise TypeError(f"expected the hidden states as first argument or one of {names}")


class DroppedAttention(nn.Module):
    """An attention sub-block with no heads left.

    With every head masked, the masked model's attention output is the output-projection bias, a constant
    vector for every token; this module returns exactly that (a learnable ``bias``) without computing
    attention, so a pruned model reproduces the masked one. Returns ``(output, None)`` like the original.
    """

    def __init__(self, hidden: int, bias: Optional[torch.Tensor] = None):
        super().__init__()
        init = bias.detach().clone() if bias is not None else torch.zeros(hidden)
        self.bias = nn.Parameter(init)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        x = _first_input(args, kwargs, ("query", "q_x", "hidden_states"))
        return self.bias.to(x.dtype).expand_as(x), None


class DroppedMLP(nn.Module):
    """An MLP sub-block with no neurons left: returns the second linear's bias (see ``DroppedAttention``)."""

    def __init__(self, hidden: int, bias: Optional[torch.Tensor] = None):
        super().__init__()
        init = bias.detach().clone() if bias is not None else torch.zeros(hidden)
        self.bias = nn.Parameter(init)

    @property
    def c_fc(self):
        # open_clip's ResidualAttentionBlock.get_weight_dtype() reads mlp.c_fc.weight.dtype to pick the
        # text-embedding cast dtype; answer with our own parameter so that keeps following .to(dtype).
        return SimpleNamespace(weight=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.to(x.dtype).expand_as(x)
