"""The methods (cap, fastcap, magnitude, sparsegpt, wanda) on a tiny random CLIP: targets met exactly, N:M / block4 patterns, determinism, chunking."""
import pytest
import torch

from clipprune.errors import ParamError
from clipprune.sparsity import apply_weights, available_methods, parse_config, prunable_linears, sparsify, \
    sparsity_stats
from clipprune.sparsity.masks import holds_nm

from models import single_thread_fixture, tiny_open_clip
from scoring import batches

single_thread = single_thread_fixture()
TARGETS = [0.5, 0.75]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip(seed=0)


@pytest.fixture(scope="module")
def loader(model):
    return batches(model, sizes=(4, 4, 4), seed=1)  # 12 samples


def run(model, loader, **section):
    section.setdefault("targets", TARGETS)
    section.setdefault("fisher_block_size", 16)
    return sparsify(model, parse_config(section, available_methods()), loader, progress=False)


METHODS = ["cap", "fastcap", "magnitude", "sparsegpt", "wanda"]
PER_LAYER = {"sparsegpt", "wanda"}  # the target is met in every layer (sparsegpt: per block of columns)


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_targets_are_met_over_the_pruned_layers(model, loader, method):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    result = run(model, loader, method=method)
    layers = prunable_linears(model, ["vision"])
    total = sum(layer.weight.numel() for layer in layers.values())
    for target in TARGETS:
        stats = sparsity_stats(result.weights[target])
        assert stats["prunable_weights"] == total
        assert abs(stats["overall"] - target) <= 1.5 / total
        if method in PER_LAYER:
            for name, layer in layers.items():
                assert abs(stats["per_layer"][name] - target) <= 1 / layer.weight.numel(), name
    # the model itself is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())
    if method in PER_LAYER:
        assert result.meta["num_samples_used"] == 12  # num_grads 1024 capped by the 12 calibration samples
    elif method != "magnitude":
        assert result.meta["num_grads_used"] == 12  # num_grads 1024 capped by the 12 calibration samples


@pytest.mark.parametrize("method", METHODS)
def test_nm_masks_hold_the_pattern_exactly(model, loader, method):
    result = run(model, loader, method=method, mask_type="2:4")
    for weights in result.weights.values():
        for name, w in weights.items():
            assert holds_nm(w, 2, 4), name
            assert ((w.reshape(-1, 4) != 0).sum(1) == 2).all(), name  # random weights: exactly N survive
        assert sparsity_stats(weights, (2, 4))["nm_pattern_holds"]


@pytest.mark.parametrize("method", METHODS)
def test_block4_prunes_whole_groups(model, loader, method):
    result = run(model, loader, method=method, mask_type="block4", targets=[0.5])
    for w in result.weights[0.5].values():
        zeros = (w.reshape(-1, 4) == 0).sum(1)
        assert bool(((zeros == 0) | (zeros == 4)).all())
    assert abs(sparsity_stats(result.weights[0.5])["overall"] - 0.5) < 0.01


@pytest.mark.parametrize("method", ["cap", "fastcap", "sparsegpt", "wanda"])
def test_runs_are_deterministic(model, loader, method):
    first, second = run(model, loader, method=method), run(model, loader, method=method)
    for target in TARGETS:
        for name, w in first.weights[target].items():
            assert torch.equal(w, second.weights[target][name]), name


def test_cap_chunked_rebuild_and_offload_equal_the_single_pass(model, loader):
    single = run(model, loader, method="cap", fisher_dtype="float64")
    for extra in ({"chunk_layers": 5}, {"chunk_layers": 2, "offload": True}):
        chunked = run(model, loader, method="cap", fisher_dtype="float64", **extra)
        assert chunked.meta["calibration_passes"] > 1
        for target in TARGETS:
            for name, w in single.weights[target].items():
                assert torch.equal(w, chunked.weights[target][name]), (extra, name)


@pytest.mark.parametrize("method", ["cap", "sparsegpt"])
def test_weight_updating_methods_beat_magnitude_on_the_calibration_loss(model, loader, method):
    """One-shot CAP and SparseGPT at 75% should change the calibration loss less than magnitude pruning does
    (Wanda, which updates no weight, does not on this random model)."""
    from clipprune.scoring.losses import contrastive

    def loss(weights):
        pruned = model.copy()
        apply_weights(pruned, weights, ["vision"])
        with torch.no_grad():
            return sum(float(contrastive(pruned.encode_image(i), pruned.encode_text(t), pruned.logit_scale))
                       for i, t in loader)

    with torch.no_grad():
        dense = sum(float(contrastive(model.encode_image(i), model.encode_text(t), model.logit_scale))
                    for i, t in loader)
    pruned = run(model, loader, method=method, damp=1e-4, targets=[0.75]).weights[0.75]
    magnitude = run(model, loader, method="magnitude", targets=[0.75]).weights[0.75]
    assert abs(loss(pruned) - dense) < abs(loss(magnitude) - dense)


def test_text_tower_with_an_image_only_loss_is_refused(model, loader):
    with pytest.raises(ParamError, match="^sparsity.towers"):
        run(model, loader, method="cap", towers="text", loss="entropy")
    with pytest.raises(ParamError, match="^sparsity.loss"):
        run(model, loader, method="cap", loss="nope")
