"""Physical pruning reproduces the masked model, shrinks it, and drops empty sub-blocks."""
import copy

import pytest
import torch

from clipprune.models import apply_masks, full_masks, prune_model
from clipprune.models.attention import DroppedAttention, DroppedMLP

from . import (OPEN_CLIP_CFG, encode, random_masks, sample_inputs, single_thread_fixture, tiny_model,
               tiny_open_clip)

single_thread = single_thread_fixture()
FAMILIES = ["open_clip", "hf"]


def _masked(model, masks, images, tokens):
    with apply_masks(model, masks):
        return encode(model, images, tokens)


def _assert_same(got, expected, atol=1e-5):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=atol, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("real_valued", [False, True])
def test_pruned_equals_masked(family, real_valued):
    model = tiny_model(family, seed=1)
    images, tokens = sample_inputs(model)
    masks = random_masks(model, seed=7, real_valued=real_valued)
    before = copy.deepcopy(model.module.state_dict())
    dense = encode(model, images, tokens)
    expected = _masked(model, masks, images, tokens)
    assert (expected[0] - dense[0]).abs().max() > 1e-3  # the masks matter
    pruned = prune_model(model, masks)
    _assert_same(encode(pruned, images, tokens), expected)
    # the input model is untouched
    after = model.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _assert_same(encode(model, images, tokens), dense, atol=0)
    # widths follow the masks
    for key, mask in masks.items():
        tower, kind = key.split(".")
        for view, row in zip(pruned.towers[tower].block_views(), mask):
            width = view.num_heads if kind == "head" else view.ffn_dim
            assert width == int((row != 0).sum())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_sub_blocks_are_dropped(family):
    model = tiny_model(family, seed=2)
    images, tokens = sample_inputs(model)
    masks = full_masks(model)
    masks["vision.head"][0] = 0.0      # attention of vision block 0 gone
    masks["vision.neuron"][1] = 0.0    # MLP of vision block 1 gone
    masks["text.neuron"][0] = 0.0      # MLP of text block 0 (open_clip reads its dtype there)
    masks["text.head"][1] = 0.0
    expected = _masked(model, masks, images, tokens)
    pruned = prune_model(model, masks)
    vision, text = pruned.towers["vision"], pruned.towers["text"]
    assert vision.block_view(0).num_heads == 0 and vision.context_module(0) is None
    assert isinstance(vision.attention(0), DroppedAttention)
    assert vision.block_view(1).ffn_dim == 0 and vision.mlp_out_module(1) is None
    assert isinstance(vision.mlp(1), DroppedMLP)
    assert text.block_view(0).ffn_dim == 0 and text.block_view(1).num_heads == 0
    assert vision.block_view(0).ffn_dim == model.towers["vision"].block_view(0).ffn_dim
    _assert_same(encode(pruned, images, tokens), expected)
    # dropped sub-blocks take no heavy compute: no q/k/v or fc parameters remain in them
    assert [n for n, _ in vision.attention(0).named_parameters()] == ["bias"]
    # masks of the pruned model skip dropped sub-blocks and still apply
    again = full_masks(pruned)
    assert again["vision.head"][0].sum() == 0
    _assert_same(_masked(pruned, again, images, tokens), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_a_pruned_model_composes(family):
    model = tiny_model(family, seed=3)
    images, tokens = sample_inputs(model)
    first = random_masks(model, seed=11, real_valued=True, keep=0.8)
    once = prune_model(model, first)
    second = random_masks(once, seed=12, real_valued=False, keep=0.7)
    for key in second:  # keep the padding of narrower blocks at zero
        second[key] = second[key] * full_masks(once)[key]
    expected = _masked(once, second, images, tokens)
    twice = prune_model(once, second)
    _assert_same(encode(twice, images, tokens), expected)
    tower = twice.towers["vision"]
    for i in range(len(tower.blocks())):
        original_ids = [h for h, kept in enumerate(first["vision.head"][i]) if kept != 0]
        kept_now = [original_ids[j] for j, kept in enumerate(second["vision.head"][i][:len(original_ids)]) if kept]
        assert tower.head_index(i) == kept_now


def test_per_head_text_mask_is_mapped_after_pruning():
    """open_clip text towers with a padding mask build (batch*heads) masks for the original head count."""
    cfg = copy.deepcopy(OPEN_CLIP_CFG)
    cfg["custom_text"] = True
    cfg["text_cfg"].update(embed_cls=True, pad_id=0)  # class token => (batch*heads, L, L) padding mask
    model = tiny_open_clip(seed=4, model_cfg=cfg)
    images, tokens = sample_inputs(model)
    masks = full_masks(model)
    masks["text.head"][0] = torch.tensor([0.0, 1.0, 0.0, 1.5])
    masks["text.head"][1] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    expected = _masked(model, masks, images, tokens)
    pruned = prune_model(model, masks)
    assert pruned.towers["text"].head_index(0) == [1, 3]
    assert model.towers["text"].tokens == model.context_length + 1
    _assert_same(encode(pruned, images, tokens), expected)
    assert model.tower_param_count("text") > pruned.tower_param_count("text")


def test_prune_model_while_masks_are_applied_does_not_copy_hooks():
    model = tiny_model("open_clip")
    images, tokens = sample_inputs(model)
    masks = random_masks(model, seed=5, real_valued=True)
    with apply_masks(model, masks):
        expected = encode(model, images, tokens)
        pruned = prune_model(model, masks)
    assert all(not m._forward_pre_hooks for m in pruned.module.modules())
    _assert_same(encode(pruned, images, tokens), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_masks_apply_and_prune_on_cuda(family):
    model = tiny_model(family, seed=6).to("cuda")
    images, tokens = (t.to("cuda") for t in sample_inputs(model))
    masks = {k: v.cpu() for k, v in random_masks(model, seed=8, real_valued=True).items()}
    expected = _masked(model, masks, images, tokens)
    pruned = prune_model(model, masks)
    assert all(p.device.type == "cuda" for p in pruned.parameters())
    _assert_same(encode(pruned, images, tokens), expected, atol=1e-4)
