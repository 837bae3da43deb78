"""The MAC / parameter model against hand-derived numbers (ViT-B/32 at 224 and tiny towers), and against an
independent oracle: torch's FlopCounterMode on real dense and physically pruned models of both families."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipprune import flops
from clipprune.errors import MaskError, ParamError
from clipprune.models.pruned import export_pruned, load_pruned
from clipprune.models import full_masks, load_model
from clipprune.models.base import BlockView
from clipprune.models.prune import prune_model

from models import open_clip_config, sample_inputs, single_thread_fixture, tiny_hf, tiny_open_clip

single_thread = single_thread_fixture()

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


# ---------------------------------------------------------------------------------------------
# an independent oracle: torch's FlopCounterMode on real dense and physically pruned models
# ---------------------------------------------------------------------------------------------
# FLOPs that FlopCounterMode reports = 2 × MACs. Linear layers run as addmm (with bias) or mm; the attention
# products as bmm once scaled_dot_product_attention is forced to its math backend (the fused CPU kernel,
# _scaled_dot_product_flash_attention_for_cpu, has no formula in the counter and would count as 0).
LINEAR_OPS = {"aten.addmm", "aten.mm"}
ATTENTION_OPS = {"aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_efficient_attention",
                 "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_cudnn_attention"}


def count_blocks(model, tower: str, inputs: torch.Tensor) -> tuple[list[dict[str, int]], dict[str, int]]:
    """(FLOPs by op of each block of ``tower``, FLOPs by op of the whole encoder) for one forward.

    Each block is counted by its own FlopCounterMode, entered and left by hooks on that block module, so a
    block's count holds exactly what runs inside it: nothing of embeddings, final norms or projections.
    """
    blocks = model.towers[tower].blocks()
    per_block: list[dict[str, int] | None] = [None] * len(blocks)
    active: dict[int, FlopCounterMode] = {}

    def enter(index):
        def hook(module, args):
            active[index] = FlopCounterMode(display=False)
            active[index].__enter__()
        return hook

    def leave(index):
        def hook(module, args, output):
            mode = active.pop(index)
            mode.__exit__(None, None, None)
            per_block[index] = {str(op): n for op, n in mode.get_flop_counts()["Global"].items()}
        return hook

    def run():
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            model.encode_image(inputs) if tower == "vision" else model.encode_text(inputs)

    # frozen parameters: a dropped sub-block returns its expanded bias, a view of a parameter that under
    # no_grad still "requires grad" without a grad_fn, which the counter's module tracker cannot hook
    params = [p for p in model.parameters() if p.requires_grad]
    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave(i)))]
    try:
        for p in params:
            p.requires_grad_(False)
        run()
        assert all(count is not None for count in per_block), "a block did not run"
        with FlopCounterMode(display=False) as whole:  # a second forward: counter modes do not nest cleanly
            run()
    finally:
        for handle in handles:
            handle.remove()
        for mode in active.values():
            mode.__exit__(None, None, None)
        for p in params:
            p.requires_grad_(True)
    return per_block, {str(op): n for op, n in whole.get_flop_counts()["Global"].items()}


def check_against_counter(model, tower: str, inputs: torch.Tensor):
    """Assert, block by block, counter MACs == flops.block_macs and the attention products == 2·s²·dh per
    head; returns the tower's counted prunable MACs (== flops.tower_macs) and ``count_blocks``' counts."""
    views = model.towers[tower].block_views()
    per_block, whole = count_blocks(model, tower, inputs)
    total = 0
    for view, counted in zip(views, per_block):
        assert set(counted) <= LINEAR_OPS | ATTENTION_OPS, (tower, view.index, counted)
        linear = sum(n for op, n in counted.items() if op in LINEAR_OPS)
        attention = sum(n for op, n in counted.items() if op in ATTENTION_OPS)
        assert linear % 2 == 0 and attention % 2 == 0
        macs = (linear + attention) // 2
        assert macs == flops.block_macs(view), (tower, view)
        s, dh = view.tokens, view.head_dim
        assert attention // 2 == view.num_heads * 2 * s * s * dh, (tower, view)  # QKᵀ and A·V
        total += macs
    assert total == flops.tower_macs(views)
    return total, per_block, whole


def uneven_masks(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per layer, cycling: attention dropped + some neurons; some heads + MLP dropped; some of both.

    Kept counts differ per layer; kept entries carry real-valued scales (folded into the weights on export).
    """
    gen = torch.Generator().manual_seed(seed)
    masks = full_masks(model)
    for key, mask in masks.items():
        kind = key.rpartition(".")[2]
        layers, width = mask.shape
        for layer in range(layers):
            pattern = layer % 3
            if (pattern == 0 and kind == "head") or (pattern == 1 and kind == "neuron"):
                mask[layer] = 0
                continue
            keep = 1 + (layer * 7 + (3 if kind == "head" else 11)) % (width - 1)  # 1 .. width-1, uneven
            chosen = torch.randperm(width, generator=gen)[:keep]
            mask[layer] = 0
            mask[layer, chosen] = 0.5 + torch.rand(keep, generator=gen)
    return masks


def tower_masks(masks, tower):
    return {k: v for k, v in masks.items() if k.startswith(f"{tower}.")}


def oracle_models():
    return {"fixture": lambda: load_model("fixture:tiny_clip"), "open_clip": tiny_open_clip, "hf": tiny_hf}


@pytest.mark.parametrize("name", ["fixture", "open_clip", "hf"])
def test_mac_model_equals_the_flop_counter_dense_and_pruned(name, tmp_path):
    dense = oracle_models()[name]()
    images, tokens = sample_inputs(dense, batch=1)
    masks = uneven_masks(dense)
    pruned = prune_model(dense, masks)
    exported = load_pruned(export_pruned(dense, masks, tmp_path / "pruned"))  # what evaluate measures
    for tower, inputs in (("vision", images), ("text", tokens)):
        assert check_against_counter(exported, tower, inputs)[0] == check_against_counter(pruned, tower, inputs)[0]
        views = pruned.towers[tower].block_views()
        assert any(v.num_heads == 0 for v in views) and any(v.ffn_dim == 0 for v in views)
        assert len({(v.num_heads, v.ffn_dim) for v in views}) == len(views)  # uneven widths
        dense_macs, _, _ = check_against_counter(dense, tower, inputs)
        pruned_macs, _, _ = check_against_counter(pruned, tower, inputs)
        assert dense_macs == flops.prunable_macs({tower: dense.towers[tower]})
        # the MAC model of the masks on the dense model == the compute of the physically pruned model
        assert pruned_macs == flops.masked_macs({tower: dense.towers[tower]}, tower_masks(masks, tower))
        assert 0 < pruned_macs < dense_macs


@pytest.mark.parametrize("name", ["fixture", "open_clip", "hf"])
def test_outside_the_blocks_only_the_patch_embedding_and_projections_compute(name):
    """Embeddings (lookups), LayerNorm, softmax and GELU count no MACs; what the counter sees outside the
    blocks is the patch embedding and the final projection, as flops.non_prunable_macs says."""
    model = oracle_models()[name]()
    images, tokens = sample_inputs(model, batch=1)
    if model.family == "hf":
        embed_dim, patch = model.module.config.projection_dim, model.module.config.vision_config.patch_size
    else:
        embed_dim, patch = model.module.visual.proj.shape[1], model.module.visual.conv1.kernel_size[0]
    for tower, inputs in (("vision", images), ("text", tokens)):
        views = model.towers[tower].block_views()
        per_block, whole = count_blocks(model, tower, inputs)
        outside = {op: n - sum(b.get(op, 0) for b in per_block) for op, n in whole.items()}
        outside = {op: n for op, n in outside.items() if n}
        expected = flops.non_prunable_macs(views, embed_dim, patch_size=patch if tower == "vision" else None)
        assert sum(outside.values()) == 2 * expected["total"], (tower, outside)
        if tower == "vision":
            assert outside["aten.convolution"] == 2 * expected["patch_embed"]


def test_vit_b32_real_size_against_the_counter():
    """open_clip ViT-B-32 (random weights), vision tower, one image: the counter gives DESIGN §5's figures."""
    import open_clip

    from clipprune.models.open_clip_adapter import OpenClipModel

    torch.manual_seed(0)
    model = OpenClipModel(open_clip.create_model("ViT-B-32").eval(), "open_clip:ViT-B-32",
                          open_clip_config(open_clip.get_model_config("ViT-B-32")))
    image = torch.randn(1, 3, 224, 224)
    dense, per_block, whole = check_against_counter(model, "vision", image)
    assert dense == flops.tower_macs(vit_b32_views())
    assert round(dense / 1e9, 2) == 4.29  # the encoder at s = 50
    assert round(sum(whole.values()) / 2 / 1e9, 2) == 4.41  # the whole visual tower, as commonly quoted

    masks = {"vision.head": torch.ones(LAYERS, HEADS), "vision.neuron": torch.ones(LAYERS, FFN)}
    masks["vision.head"][0, 5] = 0          # block 0: one head less
    masks["vision.neuron"][1, 100] = 0      # block 1: one neuron less
    masks["vision.head"][2] = 0             # block 2: attention dropped
    masks["vision.neuron"][3] = 0           # block 3: MLP dropped
    masks["vision.head"][4, :7] = 0         # block 4: 5 heads, 1000 neurons
    masks["vision.neuron"][4, 1000:] = 0
    pruned = prune_model(model, masks)
    pruned_macs, pruned_blocks, _ = check_against_counter(pruned, "vision", image)
    assert pruned_macs == flops.masked_macs({"vision": model.towers["vision"]}, masks)
    head = (sum(per_block[0].values()) - sum(pruned_blocks[0].values())) // 2
    neuron = (sum(per_block[1].values()) - sum(pruned_blocks[1].values())) // 2
    assert head == 10_150_400 and neuron == 76_800
    assert round(head / neuron) == 132  # a head costs about 132 neurons
