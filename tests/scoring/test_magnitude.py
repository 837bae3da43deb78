"""Magnitude baseline against norms computed directly from the original weight tensors."""
import copy

import pytest
import torch

from clipprune.models import full_masks, prune_model
from clipprune.models.open_clip_adapter import OpenClipModel
from clipprune.scoring import get_criterion

from models import open_clip_config, random_open_clip_module, single_thread_fixture, tiny_model

single_thread = single_thread_fixture()


def head_norm(q, k, v, out, h, dh):
    rows = slice(h * dh, (h + 1) * dh)
    total = sum(float((w[rows] ** 2).sum()) for w in (q, k, v)) + float((out[:, rows] ** 2).sum())
    return total ** 0.5


def neuron_norm(fc1, fc2, j):
    return (float((fc1[j] ** 2).sum()) + float((fc2[:, j] ** 2).sum())) ** 0.5


def test_open_clip_magnitude_from_the_original_in_proj_weights():
    plain = random_open_clip_module(seed=2)
    original = copy.deepcopy(plain)  # keeps nn.MultiheadAttention (the adapter replaces it in place)
    model = OpenClipModel(plain, "test:open_clip", open_clip_config())
    scores = get_criterion("magnitude")(model, None, towers="both").scores
    towers = {"vision": original.visual.transformer, "text": original.transformer}
    for name, transformer in towers.items():
        for layer, block in enumerate(transformer.resblocks):
            d, heads = block.attn.embed_dim, block.attn.num_heads
            q, k, v = block.attn.in_proj_weight.detach().split(d)
            for h in range(heads):
                expected = head_norm(q, k, v, block.attn.out_proj.weight.detach(), h, d // heads)
                assert scores[f"{name}.head"][layer, h].item() == pytest.approx(expected, rel=1e-5)
            fc1, fc2 = block.mlp.c_fc.weight.detach(), block.mlp.c_proj.weight.detach()
            for j in range(fc1.shape[0]):
                assert scores[f"{name}.neuron"][layer, j].item() == pytest.approx(neuron_norm(fc1, fc2, j), rel=1e-5)


def test_hf_magnitude():
    model = tiny_model("hf", seed=1)
    result = get_criterion("magnitude")(model, None, towers="vision")
    assert sorted(result.scores) == ["vision.head", "vision.neuron"] and result.grads == {}
    layers = model.module.vision_model.encoder.layers
    for layer, block in enumerate(layers):
        attn = block.self_attn
        dh = attn.head_dim
        for h in range(attn.num_heads):
            expected = head_norm(attn.q_proj.weight.detach(), attn.k_proj.weight.detach(),
                                 attn.v_proj.weight.detach(), attn.out_proj.weight.detach(), h, dh)
            assert result.scores["vision.head"][layer, h].item() == pytest.approx(expected, rel=1e-5)
        fc1, fc2 = block.mlp.fc1.weight.detach(), block.mlp.fc2.weight.detach()
        for j in (0, 7, fc1.shape[0] - 1):
            assert result.scores["vision.neuron"][layer, j].item() == pytest.approx(neuron_norm(fc1, fc2, j), rel=1e-5)


def test_magnitude_of_a_pruned_model_keeps_kept_units_and_pads_with_zero():
    model = tiny_model("open_clip")
    dense = get_criterion("magnitude")(model, None, towers="vision").scores
    masks = full_masks(model)
    masks["vision.head"][0, [1, 3]] = 0.0
    masks["vision.neuron"][1, 10:] = 0.0
    masks["vision.neuron"][1, :10] = 0.0  # the whole MLP of block 1 goes
    pruned = get_criterion("magnitude")(prune_model(model, masks), None, towers="vision").scores
    assert pruned["vision.head"].shape == dense["vision.head"].shape
    torch.testing.assert_close(pruned["vision.head"][0, :2], dense["vision.head"][0, [0, 2]])
    assert pruned["vision.head"][0, 2:].eq(0).all()
    torch.testing.assert_close(pruned["vision.head"][1], dense["vision.head"][1])
    assert pruned["vision.neuron"][1].eq(0).all()
    torch.testing.assert_close(pruned["vision.neuron"][0], dense["vision.neuron"][0])


def test_l1_norm_option_sums_absolute_weights():
    plain = random_open_clip_module(seed=3)
    original = copy.deepcopy(plain)
    model = OpenClipModel(plain, "test:open_clip", open_clip_config())
    result = get_criterion("magnitude")(model, None, towers="vision", norm="l1")
    assert result.meta["norm"] == "l1"
    block = original.visual.transformer.resblocks[0]
    d, heads = block.attn.embed_dim, block.attn.num_heads
    dh = d // heads
    q, k, v = block.attn.in_proj_weight.detach().split(d)
    out = block.attn.out_proj.weight.detach()
    rows = slice(0, dh)
    expected_head = sum(float(w[rows].abs().sum()) for w in (q, k, v)) + float(out[:, rows].abs().sum())
    assert result.scores["vision.head"][0, 0].item() == pytest.approx(expected_head, rel=1e-5)
    fc1, fc2 = block.mlp.c_fc.weight.detach(), block.mlp.c_proj.weight.detach()
    expected_neuron = float(fc1[3].abs().sum() + fc2[:, 3].abs().sum())
    assert result.scores["vision.neuron"][0, 3].item() == pytest.approx(expected_neuron, rel=1e-5)
