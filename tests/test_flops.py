"""The MAC / parameter model against hand-derived numbers (ViT-B/32 at 224 and tiny towers)."""
import pytest
import torch

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.models.base import BlockView

LAYERS, HEADS, FFN = 12, 12, 3072


def vit_b32_views():
    return [BlockView(index=i, num_heads=HEADS, head_dim=64, hidden=768, ffn_dim=FFN, tokens=50)
            for i in range(LAYERS)]


def test_vit_b32_head_is_about_132_neurons():
    view = vit_b32_views()[0]
    assert flops.head_macs(view) == 4 * 50 * 768 * 64 + 2 * 50 * 50 * 64 == 10_150_400
    assert flops.neuron_macs(view) == 2 * 50 * 768 == 76_800
    assert abs(flops.head_macs(view) / flops.neuron_macs(view) - 132) <= 1


def test_vit_b32_encoder_gmacs():
    views = vit_b32_views()
    total = flops.tower_macs(views)
    assert total == LAYERS * (HEADS * 10_150_400 + FFN * 76_800)
    assert round(total / 1e9, 2) == 4.29
    assert flops.prunable_macs({"vision": views}) == total
    assert flops.prunable_macs(views) == total


def test_vit_b32_non_prunable_and_whole_tower():
    views = vit_b32_views()
    outside = flops.non_prunable_macs(views, embed_dim=512, patch_size=32)
    assert outside["patch_embed"] == 49 * 3 * 32 * 32 * 768
    assert outside["projection"] == 768 * 512
    assert outside["total"] == outside["patch_embed"] + outside["projection"]
    # the commonly quoted figure for the whole visual tower
    assert round((flops.tower_macs(views) + outside["total"]) / 1e9, 2) == 4.41
    text_outside = flops.non_prunable_macs([], embed_dim=512, hidden=512)
    assert text_outside == {"patch_embed": 0, "projection": 512 * 512, "total": 512 * 512}


def test_params_metric():
    view = vit_b32_views()[0]
    # q, k, v: 3 · (d·dh + dh); out projection columns: d·dh
    assert flops.head_params(view) == 3 * (768 * 64 + 64) + 768 * 64
    assert flops.neuron_params(view) == 768 + 1 + 768
    assert flops.unit_costs(view, "params") == (flops.head_params(view), flops.neuron_params(view))
    dense = flops.prunable_macs(vit_b32_views(), "params")
    # ViT-B's 12 blocks hold ~85M parameters; the prunable share excludes LayerNorms and two biases
    assert dense == LAYERS * (HEADS * flops.head_params(view) + FFN * flops.neuron_params(view))
    assert 84e6 < dense < 85e6


def test_masked_counts_and_kept_fraction():
    views = vit_b32_views()
    head = torch.ones(LAYERS, HEADS)
    neuron = torch.ones(LAYERS, FFN)
    head[0, :6] = 0          # layer 0 keeps 6 heads
    head[11] = 0             # layer 11 drops attention
    neuron[1, :1000] = 0     # layer 1 keeps 2072 neurons
    neuron[2, 5] = 0.0
    neuron[3, 7] = 0.37      # real-valued scale still counts as kept
    masks = {"vision.head": head, "vision.neuron": neuron}
    kept_heads = LAYERS * HEADS - 6 - HEADS
    kept_neurons = LAYERS * FFN - 1000 - 1
    expected = kept_heads * 10_150_400 + kept_neurons * 76_800
    assert flops.masked_macs({"vision": views}, masks) == expected
    assert flops.kept_fraction({"vision": views}, masks) == pytest.approx(expected / flops.tower_macs(views))
    # bare lists: the single tower in the masks is used
    assert flops.masked_macs(views, masks) == expected
    expected_params = kept_heads * flops.head_params(views[0]) + kept_neurons * flops.neuron_params(views[0])
    assert flops.masked_macs({"vision": views}, masks, "params") == expected_params


def test_missing_tower_or_kind_counts_dense_and_all_zero_counts_nothing():
    views = vit_b32_views()
    small = [BlockView(index=i, num_heads=2, head_dim=8, hidden=16, ffn_dim=32, tokens=7) for i in range(3)]
    towers = {"vision": views, "text": small}
    zero = {"text.head": torch.zeros(3, 2), "text.neuron": torch.zeros(3, 32)}
    assert flops.masked_macs(towers, zero) == flops.tower_macs(views)
    only_heads = {"text.head": torch.zeros(3, 2)}
    assert flops.masked_macs({"text": small}, only_heads) == 3 * 32 * flops.neuron_macs(small[0])
    # no masks at all: dense
    assert flops.kept_fraction(towers, {}) == 1.0


def test_ragged_widths_take_per_layer_masks():
    views = [BlockView(0, 3, 8, 16, 10, 5), BlockView(1, 1, 8, 16, 4, 5)]
    masks = {"vision.head": [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0])],
             "vision.neuron": [torch.ones(10), torch.tensor([1.0, 1.0, 0.0, 0.0])]}
    h, n = flops.unit_costs(views[0])
    assert h == 4 * 5 * 16 * 8 + 2 * 25 * 8 and n == 2 * 5 * 16
    assert flops.masked_macs({"vision": views}, masks) == 2 * h + 12 * n
    # a rectangular tensor cannot describe ragged widths
    with pytest.raises(MaskError, match="vision.head"):
        flops.masked_macs({"vision": views}, {"vision.head": torch.ones(2, 3)})


def test_bad_masks_and_metric_raise():
    views = vit_b32_views()
    with pytest.raises(MaskError, match="vision.head"):
        flops.masked_macs({"vision": views}, {"vision.head": torch.ones(LAYERS, HEADS + 1)})
    with pytest.raises(MaskError, match="vision.neuron"):
        flops.masked_macs({"vision": views}, {"vision.neuron": torch.ones(LAYERS - 1, FFN)})
    with pytest.raises(MaskError, match="text"):
        flops.masked_macs({"vision": views}, {"text.head": torch.ones(LAYERS, HEADS)})
    with pytest.raises(MaskError, match="towers"):
        flops.masked_macs(views, {"vision.head": torch.ones(LAYERS, HEADS), "text.head": torch.ones(1, 1)})
    with pytest.raises(ParamError, match="metric"):
        flops.prunable_macs(views, "flops")


def test_dropped_sub_blocks_cost_nothing():
    view = BlockView(index=0, num_heads=0, head_dim=64, hidden=768, ffn_dim=0, tokens=50)
    assert flops.block_macs(view) == 0
    half = BlockView(index=0, num_heads=6, head_dim=64, hidden=768, ffn_dim=1536, tokens=50)
    assert flops.block_macs(half) * 2 == flops.block_macs(vit_b32_views()[0])
