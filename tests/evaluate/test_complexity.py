"""Complexity report of a small fake CLIP with known shapes."""
import pytest
import torch
from torch import nn

from clipprune import flops
from clipprune.errors import DataError
from clipprune.evaluate.complexity import (file_size_bytes, file_size_mb, find_patch_embedding,
                                           model_complexity, tower_complexity)
from clipprune.models.base import BlockView, ClipModel, Tower

EMBED = 10


class FixedTower(Tower):
    def __init__(self, name, views):
        self.name, self.views, self.tokens = name, views, views[0].tokens

    def blocks(self):
        return [nn.Identity() for _ in self.views]

    def block_view(self, i):
        return self.views[i]


class ShapedClip(ClipModel):
    """Vision: 16×16 images, 4×4 patches (16 patches + class token), width 16; text: 8 tokens, width 12."""

    family = "fake"
    name = "shaped"
    image_size = 16

    def __init__(self):
        self.module = nn.ModuleDict({
            "patch": nn.Conv2d(3, 16, kernel_size=4, stride=4, bias=False),
            "pointwise": nn.Conv2d(16, 16, kernel_size=1),  # not a patch embedding (1×1)
            "visual_proj": nn.Linear(16, EMBED, bias=False),
            "text_proj": nn.Linear(12, EMBED, bias=False),
        })
        vision = [BlockView(i, 4, 4, 16, 64, 17) for i in range(2)]
        text = [BlockView(i, 3, 4, 12, 48, 8) for i in range(3)]
        self.towers = {"vision": FixedTower("vision", vision), "text": FixedTower("text", text)}
        self.tokenizer = lambda texts: torch.zeros(len(texts), 8, dtype=torch.long)

    def encode_text(self, tokens):
        return torch.ones(tokens.shape[0], EMBED)

    def tower_param_count(self, tower):
        return {"vision": 1000, "text": 2000}[tower]


def test_tower_complexity_dense():
    model = ShapedClip()
    assert find_patch_embedding(model.module) is model.module["patch"]
    vision = tower_complexity(model, "vision")
    views = model.towers["vision"].block_views()
    assert vision["prunable_gmacs"] == pytest.approx(flops.tower_macs(views) / 1e9)
    assert vision["non_prunable_gmacs"] == pytest.approx((16 * 3 * 4 * 4 * 16 + 16 * EMBED) / 1e9)
    assert vision["total_gmacs"] == pytest.approx(vision["prunable_gmacs"] + vision["non_prunable_gmacs"])
    assert vision["params"] == 1000 and vision["kept_mac_fraction"] == 1.0
    text = tower_complexity(model, "text")
    assert text["non_prunable_gmacs"] == pytest.approx(12 * EMBED / 1e9)  # no patch embedding
    assert text["prunable_params"] == 3 * (3 * flops.head_params(model.towers["text"].block_view(0))
                                           + 48 * flops.neuron_params(model.towers["text"].block_view(0)))
    with pytest.raises(DataError, match="audio"):
        tower_complexity(model, "audio")


def test_model_complexity_with_masks():
    model = ShapedClip()
    head = torch.ones(2, 4)
    head[1, :2] = 0
    masks = {"vision.head": head, "vision.neuron": torch.ones(2, 64)}
    report = model_complexity(model, masks)
    views = model.towers["vision"].block_views()
    kept = flops.tower_macs(views) - 2 * flops.head_macs(views[0])
    assert report["towers"]["vision"]["prunable_gmacs"] == pytest.approx(kept / 1e9)
    assert report["towers"]["vision"]["kept_mac_fraction"] == pytest.approx(kept / flops.tower_macs(views))
    assert report["towers"]["text"]["kept_mac_fraction"] == 1.0
    assert report["embed_dim"] == EMBED
    assert report["params"] == sum(p.numel() for p in model.module.parameters())
    with torch.no_grad():
        model.module["text_proj"].weight[:5] = 0
    assert model_complexity(model)["nonzero_params"] == report["params"] - 5 * 12


def test_file_sizes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 500)
    assert file_size_bytes(tmp_path / "a.bin") == 1000
    assert file_size_bytes(tmp_path) == 1500
    assert file_size_mb(tmp_path) == pytest.approx(0.0015)
    with pytest.raises(DataError, match="missing"):
        file_size_bytes(tmp_path / "missing")
