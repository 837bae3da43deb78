"""Mask creation, hooks (forward and gradients), validation and the safetensors file format."""
import os

import pytest
import torch

from clipprune.errors import MaskError, ParamError
from clipprune.models import apply_masks, full_masks, load_masks, prune_model, save_masks, validate_masks

from . import encode, sample_inputs, single_thread_fixture, tiny_model

FAMILIES = ["open_clip", "hf"]

single_thread = single_thread_fixture()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_full_masks_shapes_and_towers(model):
    masks = full_masks(model)
    vision, text = model.towers["vision"].block_view(0), model.towers["text"].block_view(0)
    assert masks["vision.head"].shape == (2, vision.num_heads)
    assert masks["vision.neuron"].shape == (2, vision.ffn_dim)
    assert masks["text.head"].shape == (2, text.num_heads)
    assert masks["text.neuron"].shape == (2, text.ffn_dim)
    assert all(bool((m == 1).all()) and not m.requires_grad for m in masks.values())
    only_vision = full_masks(model, towers=("vision",), requires_grad=True)
    assert sorted(only_vision) == ["vision.head", "vision.neuron"]
    assert all(m.requires_grad and m.is_leaf for m in only_vision.values())
    with pytest.raises(ParamError, match="towers"):
        full_masks(model, towers=("audio",))


def test_all_ones_masks_leave_outputs_unchanged(model):
    images, tokens = sample_inputs(model)
    dense = encode(model, images, tokens)
    with apply_masks(model, full_masks(model)):
        masked = encode(model, images, tokens)
    for got, ref in zip(masked, dense):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_zero_head_mask_equals_zeroed_out_proj_columns(model):
    """Head mask semantics, checked against a manual edit of the output projection."""
    images, tokens = sample_inputs(model)
    masks = full_masks(model)
    masks["vision.head"][1, 2] = 0.0
    masks["vision.neuron"][0, :5] = 0.0
    with apply_masks(model, masks):
        masked_image, _ = encode(model, images, tokens)
    edited = model.copy()
    tower = edited.towers["vision"]
    head_dim = tower.block_view(1).head_dim
    with torch.no_grad():
        tower.context_module(1).weight[:, 2 * head_dim:3 * head_dim] = 0.0
        tower.mlp_out_module(0).weight[:, :5] = 0.0
    expected_image, _ = encode(edited, images, tokens)
    dense_image, _ = encode(model, images, tokens)
    assert (masked_image - dense_image).abs().max() > 1e-4  # the mask does something
    torch.testing.assert_close(masked_image, expected_image, atol=1e-6, rtol=0)


def test_hooks_are_removed_on_exit(model):
    images, tokens = sample_inputs(model)
    dense = encode(model, images, tokens)
    zeros = {k: torch.zeros_like(v) for k, v in full_masks(model).items()}
    with pytest.raises(RuntimeError, match="boom"):
        with apply_masks(model, zeros):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.module.modules())
    after = encode(model, images, tokens)
    for got, ref in zip(after, dense):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_gradients_flow_to_masks_and_match_finite_differences(model):
    images, tokens = sample_inputs(model)
    masks = full_masks(model, requires_grad=True)
    with apply_masks(model, masks):
        loss = (model.encode_image(images) ** 2).sum() + (model.encode_text(tokens) ** 2).sum()
    loss.backward()
    for key, mask in masks.items():
        assert mask.grad is not None and mask.grad.shape == mask.shape, key
        assert mask.grad.abs().sum() > 0, key
    # d loss / d mask[vision.head][0, 1] by central differences
    eps = 1e-3
    values = []
    for sign in (1, -1):
        shifted = {k: v.detach().clone() for k, v in masks.items()}
        shifted["vision.head"][0, 1] += sign * eps
        with torch.no_grad(), apply_masks(model, shifted):
            values.append(((model.encode_image(images) ** 2).sum() + (model.encode_text(tokens) ** 2).sum()).item())
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = masks["vision.head"].grad[0, 1].item()
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic))


@pytest.mark.parametrize("bad, message", [
    ({"vision.head": torch.ones(3, 4)}, "shape"),
    ({"vision.neuron": torch.ones(2)}, "shape"),
    ({"audio.head": torch.ones(2, 4)}, "unknown mask key"),
    ({"vision.heads": torch.ones(2, 4)}, "unknown mask key"),
    ({"vision.head": [[1.0] * 4] * 2}, "must be a tensor"),
    ({"vision.head": torch.tensor([[1.0, float("nan"), 1.0, 1.0]] * 2)}, "non-finite"),
    ({"vision.head": torch.ones(2, 4, dtype=torch.long)}, "float"),
    ({}, "non-empty"),
])
def test_validate_masks_rejects_bad_masks(bad, message):
    model = tiny_model("open_clip")
    with pytest.raises(MaskError, match=message) as info:
        validate_masks(model, bad, "search.safetensors")
    assert str(info.value).startswith("search.safetensors:") and "\n" not in str(info.value)
    if bad:
        with pytest.raises(MaskError):
            with apply_masks(model, bad):
                pass


def test_masks_of_a_pruned_model_are_padded(model):
    masks = full_masks(model)
    masks["text.head"][0, 1:] = 0.0
    pruned = prune_model(model, masks)
    padded = full_masks(pruned)
    assert padded["text.head"].tolist()[0] == [1.0, 0.0, 0.0, 0.0]
    validate_masks(pruned, padded)
    padded["text.head"][0, 3] = 1.0
    with pytest.raises(MaskError, match="layer 0 has only 1 units"):
        validate_masks(pruned, padded)


def test_save_and_load_round_trip(tmp_path, model):
    masks = full_masks(model, requires_grad=True)
    with torch.no_grad():
        masks["vision.head"][0, 0] = 0.25
    path = tmp_path / "masks" / "tuned.safetensors"
    save_masks(path, masks, {"method": "mac", "constraint": 0.5, "towers": ["vision", "text"]})
    assert sorted(os.listdir(path.parent)) == ["tuned.safetensors"]  # no temp files left behind
    loaded = load_masks(path)
    assert sorted(loaded) == sorted(masks)
    for key in masks:
        torch.testing.assert_close(loaded[key], masks[key].detach(), atol=0, rtol=0)
    _, meta = load_masks(path, with_metadata=True)
    assert meta == {"method": "mac", "constraint": 0.5, "towers": ["vision", "text"]}
    validate_masks(model, loaded, str(path))


def test_load_masks_errors(tmp_path):
    with pytest.raises(MaskError, match="not found"):
        load_masks(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(MaskError, match="corrupt.safetensors"):
        load_masks(corrupt)
    with pytest.raises(MaskError, match="malformed"):
        save_masks(tmp_path / "bad.safetensors", {"weights": torch.ones(2)})
    assert not (tmp_path / "bad.safetensors").exists()
