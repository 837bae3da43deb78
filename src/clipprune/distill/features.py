"""What the distillation losses compare, and which parameters belong to a tower, for both model families.

Token features: the vision tower's final hidden states of every token (CLS and patches) after the final
LayerNorm *and* the projection, shape ``(batch, tokens, embed_dim)``. Row 0 equals ``encode_image``'s output
(CLS pooling), so the MSE covers the embedding zero-shot uses as well as every patch token, and the
projection receives gradient (without it weight decay would shrink an untrained projection).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..errors import ModelLoadError
from ..models.base import ClipModel


def vision_tokens(model: ClipModel, images: torch.Tensor) -> torch.Tensor:
    """Projected final token features ``(batch, tokens, embed_dim)`` of the vision tower."""
    if model.family == "open_clip":
        visual = model.module.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise ModelLoadError("token distillation needs a ViT whose final LayerNorm acts on every token "
                                 "(no attentional pooling / final_ln_after_pool); use distill.loss=kl")
        x = visual.transformer(visual._embeds(images))
        x = visual.ln_post(x)
        return x @ visual.proj if visual.proj is not None else x
    if model.family == "hf":
        vision = model.module.vision_model
        hidden = vision(pixel_values=images).last_hidden_state
        return model.module.visual_projection(vision.post_layernorm(hidden))
    raise ModelLoadError(f"unsupported model family {model.family!r} for distillation")


def tower_modules(model: ClipModel, tower: str) -> list[nn.Module]:
    """The modules that make up one tower (encoder, embeddings, final norm, projection)."""
    module = model.module
    if model.family == "open_clip":
        if tower == "vision":
            return [module.visual]
        if hasattr(module, "text"):  # CustomTextCLIP
            return [module.text]
        return [module.transformer, module.token_embedding, module.ln_final]
    if model.family == "hf":
        if tower == "vision":
            return [module.vision_model, module.visual_projection]
        return [module.text_model, module.text_projection]
    raise ModelLoadError(f"unsupported model family {model.family!r} for distillation")


def tower_parameters(model: ClipModel, tower: str) -> list[nn.Parameter]:
    """Every parameter of one tower (for open_clip's plain CLIP also the text positional embedding and
    projection, which are bare parameters of the top module)."""
    params = [p for m in tower_modules(model, tower) for p in m.parameters()]
    if model.family == "open_clip" and tower == "text" and not hasattr(model.module, "text"):
        params += [model.module.positional_embedding]
        if isinstance(getattr(model.module, "text_projection", None), nn.Parameter):
            params.append(model.module.text_projection)
        elif getattr(model.module, "text_projection", None) is not None:
            params += list(model.module.text_projection.parameters())
    return _unique(params)


def top_block_parameters(model: ClipModel, tower: str, count: int) -> list[nn.Parameter]:
    """Parameters of the last ``count`` transformer blocks of a tower."""
    blocks = list(model.towers[tower].blocks())
    chosen = blocks[len(blocks) - count:] if count > 0 else []
    return _unique([p for block in chosen for p in block.parameters()])


def prunable_param_count(model: ClipModel, tower: str) -> int:
    """Parameters of the attention and MLP sub-blocks of a tower (what head / neuron pruning removes)."""
    tower_view = model.towers[tower]
    total = 0
    for i in range(len(tower_view.blocks())):
        for part in (tower_view.attention(i), tower_view.mlp(i)):
            if hasattr(part, "out_proj") or hasattr(part, tower_view.layout.fc2):
                total += sum(p.numel() for p in part.parameters())
    return total


def keep_ratio(student: ClipModel, dense: ClipModel, towers) -> float:
    """Kept share of the prunable parameters of ``towers`` (pruned model vs its dense original)."""
    kept = sum(prunable_param_count(student, t) for t in towers)
    full = sum(prunable_param_count(dense, t) for t in towers)
    return kept / full if full else 1.0


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def named_trainables(model: ClipModel, params) -> Iterator[tuple[str, nn.Parameter]]:
    """(state-dict name, parameter) for the given parameters, in the model's own order."""
    wanted = {id(p) for p in params}
    for name, p in model.module.named_parameters():
        if id(p) in wanted:
            yield name, p
