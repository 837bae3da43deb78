"""MultiHeadSelfAttention replaces nn.MultiheadAttention exactly and exposes the context to hooks."""
import copy

import pytest
import torch
from torch import nn

from clipprune.models.attention import DroppedAttention, DroppedMLP, MultiHeadSelfAttention
from clipprune.models.open_clip_adapter import OpenClipModel, convert_attention

from . import (OPEN_CLIP_CFG, encode, open_clip_config, random_open_clip_module, sample_inputs, single_thread_fixture,
               tiny_open_clip)

single_thread = single_thread_fixture()


def _random_mha(embed_dim=24, heads=3, batch_first=True, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed_dim, heads, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha.eval()


def test_replacement_keeps_both_towers_outputs():
    module = random_open_clip_module(seed=3)
    reference = copy.deepcopy(module)
    model = OpenClipModel(module, "test", open_clip_config())
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.module.modules())
    assert all(isinstance(b.attn, MultiHeadSelfAttention) for t in model.towers.values() for b in t.blocks())
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(tokens)
    new_image, new_text = encode(model, images, tokens)
    assert ref_image.abs().max() > 1e-2 and ref_text.abs().max() > 1e-2
    torch.testing.assert_close(new_image, ref_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(new_text, ref_text, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first", [True, False])
def test_module_matches_mha_with_masks(batch_first):
    mha = _random_mha(batch_first=batch_first)
    ours = MultiHeadSelfAttention.from_multihead_attention(mha).eval()
    batch, length, heads = 2, 5, 3
    x = torch.randn(batch, length, 24)
    if not batch_first:
        x = x.transpose(0, 1)
    causal = torch.full((length, length), float("-inf")).triu(1)
    per_head = torch.randn(batch * heads, length, length)
    bool_mask = torch.zeros(length, length, dtype=torch.bool)
    bool_mask[:, -1] = True
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    cases = [dict(), dict(attn_mask=causal), dict(attn_mask=per_head), dict(attn_mask=bool_mask),
             dict(key_padding_mask=padding), dict(attn_mask=causal, key_padding_mask=padding)]
    for kwargs in cases:
        with torch.no_grad():
            expected = mha(x, x, x, need_weights=False, **kwargs)[0]
            got, weights = ours(x, x, x, need_weights=False, **kwargs)
        assert weights is None
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=f"mismatch for {list(kwargs)}")


def test_out_proj_hook_fires_and_sees_context():
    model = tiny_open_clip()
    images, _ = sample_inputs(model)
    seen = []
    out_proj = model.towers["vision"].context_module(0)
    handle = out_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    view = model.towers["vision"].block_view(0)
    assert seen == [torch.Size([images.shape[0], view.tokens, view.num_heads * view.head_dim])]


def test_per_head_mask_follows_original_head_ids_after_pruning():
    """A (batch*heads) mask built for the original heads is mapped to the kept heads."""
    mha = _random_mha(seed=5)
    full = MultiHeadSelfAttention.from_multihead_attention(mha).eval()
    x = torch.randn(2, 4, 24)
    mask = torch.randn(2 * 3, 4, 4)
    kept = [0, 2]
    # reference: zero head 1's context in the full module
    def zero_head(mod, args):
        ctx = args[0].clone()
        ctx[..., 8:16] = 0
        return (ctx,)
    handle = full.out_proj.register_forward_pre_hook(zero_head)
    with torch.no_grad():
        expected = full(x, attn_mask=mask)[0]
    handle.remove()
    pruned = copy.deepcopy(full)
    rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(pruned, name)
            new = nn.Linear(24, 16)
            new.weight.copy_(old.weight[rows]); new.bias.copy_(old.bias[rows])
            setattr(pruned, name, new)
        new_out = nn.Linear(16, 24)
        new_out.weight.copy_(full.out_proj.weight[:, rows]); new_out.bias.copy_(full.out_proj.bias)
        pruned.out_proj = new_out
    pruned.num_heads = 2
    pruned.head_index = torch.tensor(kept)
    with torch.no_grad():
        got = pruned(x, attn_mask=mask)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_dropped_modules_add_only_their_bias():
    x = torch.randn(2, 5, 8)
    bias = torch.randn(8)
    out, weights = DroppedAttention(8, bias)(x, x, x, need_weights=False, attn_mask=None)
    assert weights is None and torch.equal(out, bias.expand(2, 5, 8))
    out, _ = DroppedAttention(8, bias)(hidden_states=x, attention_mask=None)
    assert torch.equal(out, bias.expand(2, 5, 8))
    mlp = DroppedMLP(8, None)
    assert torch.equal(mlp(x), torch.zeros_like(x))
    assert mlp.c_fc.weight.dtype == torch.float32
    assert mlp.to(torch.float64).c_fc.weight.dtype == torch.float64


def test_convert_attention_counts_blocks():
    module = random_open_clip_module()
    layers = OPEN_CLIP_CFG["vision_cfg"]["layers"] + OPEN_CLIP_CFG["text_cfg"]["layers"]
    assert convert_attention(module) == layers
    assert convert_attention(module) == 0  # idempotent
