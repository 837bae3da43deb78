"""Per-sample Linear gradients: rows sum to the batch gradient; num_grads cuts the stream; no made-up zeros."""
import pytest
import torch
import torch.nn.functional as F

from clipprune.errors import ClipPruneError, ParamError
from clipprune.scoring.losses import contrastive
from clipprune.sparsity import available_methods, parse_config, sparsify
from clipprune.sparsity.grads import per_sample_gradients
from clipprune.sparsity.layers import prunable_linears

from models import single_thread_fixture, tiny_open_clip
from scoring import batches

single_thread = single_thread_fixture()


def test_rows_sum_to_the_gradient_of_the_summed_batch_loss():
    model = tiny_open_clip(seed=0)
    loader = batches(model, sizes=(3, 3), seed=2)
    layers = prunable_linears(model, ["vision", "text"])
    names = ["vision.0.q_proj", "vision.1.fc2", "text.0.out_proj"]
    rows = list(per_sample_gradients(model, loader, {n: layers[n] for n in names}, loss="contrastive",
                                     num_grads=5, progress=False))
    assert [r[names[0]].shape[0] for r in rows] == [3, 2]  # 5 of 6 samples
    images, tokens = loader[0]
    weights = [layers[n].weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    loss = 3 * contrastive(model.encode_image(images), model.encode_text(tokens), model.logit_scale.detach())
    expected = torch.autograd.grad(loss, weights)
    for w in weights:
        w.requires_grad_(False)
    for name, grad in zip(names, expected):
        got = rows[0][name]
        assert got.shape == (3, *grad.shape)
        torch.testing.assert_close(got.sum(0), grad, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got[0], got[1])  # the rows differ per sample


# ---------------------------------------------------------------------------------------------
# no made-up gradients: a layer whose gradient could not be captured, or is zero everywhere, stops the run
# ---------------------------------------------------------------------------------------------
def consume(model, loader, layers, loss="contrastive", num_grads=1024):
    """Read every layer of every batch, as CAP / FastCAP do."""
    for batch in per_sample_gradients(model, loader, layers, loss=loss, num_grads=num_grads, progress=False):
        for name in layers:
            batch[name]


def bypass_mlp(model, block: int) -> None:
    """Make the vision MLP of ``block`` call its linears' weights functionally: their forward hooks never fire
    (as with nn.MultiheadAttention's out_proj), which used to give silent all-zero gradients."""
    mlp = model.towers["vision"].mlp(block)
    mlp.forward = lambda x: F.linear(mlp.gelu(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)),
                                     mlp.c_proj.weight, mlp.c_proj.bias)


def test_a_bypassed_layer_names_the_layer_and_the_batch():
    model = tiny_open_clip(seed=0)
    images, _ = batches(model, sizes=(3,), seed=2)[0]
    with torch.no_grad():
        before = model.encode_image(images)
        bypass_mlp(model, 1)
        torch.testing.assert_close(model.encode_image(images), before)  # same model, hook point bypassed
    layers = prunable_linears(model, ["vision"])
    with pytest.raises(ClipPruneError, match=r"^sparsity: layer vision\.1\.fc1 was never called in calibration "
                                             r"batch 0 \(the model bypasses") as info:
        consume(model, batches(model, sizes=(3, 3), seed=2), layers)
    assert "\n" not in str(info.value)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_cap_stops_instead_of_pruning_a_bypassed_layer_by_magnitude():
    model = tiny_open_clip(seed=0)
    bypass_mlp(model, 0)
    config = parse_config({"method": "cap", "targets": [0.5], "fisher_block_size": 16}, available_methods())
    with pytest.raises(ClipPruneError, match=r"layer vision\.0\.fc1 was never called in calibration batch 0"):
        sparsify(model, config, batches(model, sizes=(4, 4), seed=1), progress=False)


def test_a_layer_cut_off_from_the_loss_names_the_layer_and_the_batch():
    model = tiny_open_clip(seed=0)
    loader = batches(model, sizes=(3, 3), seed=2)
    layers = prunable_linears(model, ["vision", "text"])
    consume(model, loader, layers)  # the intact model passes
    calls = {"n": 0}

    def detach_after_first_batch(module, args, output):
        calls["n"] += 1
        return output.detach() if calls["n"] > 1 else None

    # from batch 1 on, text block 0's fc1 output is detached: the layer runs, no gradient reaches it
    handle = layers["text.0.fc1"].register_forward_hook(detach_after_first_batch)
    try:
        with pytest.raises(ClipPruneError, match=r"^sparsity: layer text\.0\.fc1 ran in calibration batch 1 but "
                                                 r"its output does not reach sparsity\.loss=contrastive"):
            consume(model, loader, layers)
    finally:
        handle.remove()


def test_a_layer_with_zero_gradient_on_every_sample_is_refused():
    """fc2 of vision block 1 zeroed: fc1 of that block gets δ = 0 on every sample (its Fisher would be
    damp·I, so CAP would prune it for free); fc2 itself still has a gradient."""
    model = tiny_open_clip(seed=0)
    layers = prunable_linears(model, ["vision"])
    with torch.no_grad():
        layers["vision.1.fc2"].weight.zero_()
    loader = batches(model, sizes=(3, 3), seed=2)
    with pytest.raises(ClipPruneError, match=r"^sparsity: layer vision\.1\.fc1 has an identically zero gradient "
                                             r"on all 5 calibration samples"):
        consume(model, loader, layers, num_grads=5)
    consume(model, loader, {"vision.1.fc2": layers["vision.1.fc2"]})  # fc2's own gradient is not zero


def test_text_layers_under_an_images_only_loss_are_refused_up_front():
    model = tiny_open_clip(seed=0)
    layers = prunable_linears(model, ["vision", "text"])
    with pytest.raises(ParamError, match="sparsity.towers includes text, but sparsity.loss=entropy"):
        consume(model, batches(model, sizes=(3, 3), seed=2), layers, loss="entropy")
