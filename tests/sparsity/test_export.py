"""Compact export: bitmask + values, bit-identical round trip, smaller than dense."""
import json

import pytest
import torch

from clipprune.errors import ClipPruneError, MaskError
from clipprune.sparsity import (apply_weights, available_methods, load_sparse, pack_sparse, parse_config,
                                save_sparse, sparsify, unpack_sparse)
from clipprune.sparsity.export import WEIGHTS_NAME, check_same_model, dense_size_bytes
from clipprune.sparsity.layers import parameter_names, prunable_linears
from clipprune.evaluate.complexity import file_size_bytes

from models import single_thread_fixture, tiny_open_clip

single_thread = single_thread_fixture()


def bits(t):
    return t.reshape(-1).view(torch.uint8)


def test_pack_unpack_is_bit_exact_with_signed_zeros_and_nan():
    t = torch.tensor([[0.0, -0.0, 1.5], [float("nan"), 0.0, -2.0]])
    mask, values = pack_sparse(t)
    assert mask.dtype == torch.uint8 and mask.numel() == 1 and values.numel() == 4
    assert torch.equal(bits(unpack_sparse(mask, values, [2, 3], torch.float32)), bits(t))
    with pytest.raises(ValueError):
        unpack_sparse(mask, values[:3], [2, 3], torch.float32)


@pytest.fixture(scope="module")
def sparse_model():
    model = tiny_open_clip(seed=0)
    config = parse_config({"method": "magnitude", "targets": [0.75]}, available_methods())
    weights = sparsify(model, config, None, progress=False).weights[0.75]
    apply_weights(model, weights, ["vision"])
    keys = list(parameter_names(model, prunable_linears(model, ["vision"])).values())
    return model, keys


def test_round_trip_is_bit_identical_and_smaller(sparse_model, tmp_path):
    model, keys = sparse_model
    out = save_sparse(model, keys, tmp_path / "sparse", {"sparsity": {"target": 0.75}})
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["sparse"]) == sorted(keys) and config["sparsity"]["target"] == 0.75
    loaded = load_sparse(out)
    original = model.module.state_dict()
    state = loaded.module.state_dict()
    assert sorted(state) == sorted(original)
    for key, value in state.items():
        assert value.dtype == original[key].dtype and torch.equal(bits(value), bits(original[key])), key
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    compact, dense = file_size_bytes(out / WEIGHTS_NAME), dense_size_bytes(model)
    vision_linear = sum(original[k].numel() for k in keys) * 4
    # 75% of the vision Linear weights are gone: each costs 1 bit instead of 4 bytes
    assert dense - compact > 0.7 * vision_linear


def test_same_model_gives_the_same_bytes(sparse_model, tmp_path):
    model, keys = sparse_model
    a, b = save_sparse(model, keys, tmp_path / "a"), save_sparse(model, keys, tmp_path / "b")
    assert (a / WEIGHTS_NAME).read_bytes() == (b / WEIGHTS_NAME).read_bytes()


def test_corrupt_exports_fail_with_one_line(sparse_model, tmp_path):
    model, keys = sparse_model
    out = save_sparse(model, keys, tmp_path / "bad")
    config = json.loads((out / "config.json").read_text())
    key = keys[0]
    config["sparse"][key]["shape"] = [3, 3]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipPruneError, match="malformed") as err:
        load_sparse(out)
    assert "\n" not in str(err.value)
    with pytest.raises(ClipPruneError, match="not found"):
        load_sparse(tmp_path / "missing")


def _pruned_export(tmp_path, neurons_kept):
    """The tiny model pruned structurally (heads 0 and 2 of layer 0, the first ``neurons_kept`` of 128 MLP
    neurons per layer), exported and loaded back as ``pruned:`` would."""
    from clipprune.models.pruned import export_pruned, load_pruned

    model = tiny_open_clip(seed=0)
    heads = torch.ones(2, 4)
    heads[0, [1, 3]] = 0
    neurons = torch.zeros(2, 128)
    for layer, kept in enumerate(neurons_kept):
        neurons[layer, :kept] = 1
    return load_pruned(export_pruned(model, {"vision.head": heads, "vision.neuron": neurons}, tmp_path / "pruned"))


def test_sparsity_stacks_on_a_structurally_pruned_export(tmp_path):
    pruned = _pruned_export(tmp_path, (64, 40))
    config = parse_config({"method": "magnitude", "targets": [0.5], "mask_type": "2:4"}, available_methods())
    weights = sparsify(pruned, config, None, progress=False).weights[0.5]
    assert weights["vision.0.out_proj"].shape == (64, 32) and weights["vision.1.fc2"].shape == (64, 40)
    apply_weights(pruned, weights, ["vision"])
    keys = list(parameter_names(pruned, prunable_linears(pruned, ["vision"])).values())
    out = save_sparse(pruned, keys, tmp_path / "sparse")
    assert json.loads((out / "config.json").read_text())["towers"]["vision"]["layers"][0]["head_index"] == [0, 2]
    loaded = load_sparse(out)
    check_same_model(loaded, pruned, "stacked")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), pruned.encode_image(images))
    # a dense model's sparse export keeps the format it had (no widths stored)
    dense = tiny_open_clip(seed=0)
    assert "towers" not in json.loads((save_sparse(dense, [], tmp_path / "dense") / "config.json").read_text())


def test_nm_on_a_pruned_width_that_is_no_multiple_of_m_names_the_layer(tmp_path):
    pruned = _pruned_export(tmp_path, (64, 30))
    config = parse_config({"method": "magnitude", "targets": [0.5], "mask_type": "2:4"}, available_methods())
    with pytest.raises(MaskError, match=r"^sparsity.mask_type=2:4: layer vision.1.fc2 has 30 inputs, not a "
                                        r"multiple of 4$"):
        sparsify(pruned, config, None, progress=False)
