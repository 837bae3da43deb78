"""Layer-input statistics: equal to the inputs captured explicitly, and collected block by block on the
model whose earlier blocks are already pruned."""
import pytest
import torch

from clipprune.errors import ClipPruneError
from clipprune.sparsity import apply_weights, prunable_linears
from clipprune.sparsity.inputs import InputSource, block_groups, prune_sequentially

from models import single_thread_fixture

single_thread = single_thread_fixture()


def captured_inputs(model, loader, layers, num_samples, towers=("vision",)):
    """Every input row of each layer, concatenated (explicit forward hooks, no accumulation)."""
    rows = {n: [] for n in layers}
    handles = [layer.register_forward_hook(lambda m, args, out, n=n: rows[n].append(args[0].reshape(-1, args[0].shape[-1])))
               for n, layer in layers.items()]
    seen = 0
    with torch.no_grad():
        for images, tokens in loader:
            keep = min(len(images), num_samples - seen)
            if keep <= 0:
                break
            if "vision" in towers:
                model.encode_image(images[:keep])
            if "text" in towers:
                model.encode_text(tokens[:keep])
            seen += keep
    for h in handles:
        h.remove()
    return {n: torch.cat(r).double() for n, r in rows.items()}


@pytest.mark.parametrize("towers,num_samples", [(("vision",), 12), (("vision",), 6), (("text",), 9)])
def test_statistics_equal_the_captured_inputs(model, loader, towers, num_samples):
    layers = prunable_linears(model, towers)
    source = InputSource(model, loader, towers, num_samples, progress=False)
    x = captured_inputs(model, loader, layers, num_samples, towers)
    grams = source.statistics(model, layers, "gram")
    sq_norms = source.statistics(model, layers, "sq_norm")
    for name in layers:
        torch.testing.assert_close(grams[name], x[name].T @ x[name], rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(sq_norms[name], (x[name] ** 2).sum(0), rtol=1e-10, atol=1e-8)
    assert source.passes == 2


def test_block_groups_follow_the_blocks_in_order():
    names = ["vision.0.q_proj", "vision.0.fc2", "vision.1.fc1", "text.0.q_proj", "text.0.fc1"]
    assert block_groups(names) == [["vision.0.q_proj", "vision.0.fc2"], ["vision.1.fc1"],
                                   ["text.0.q_proj", "text.0.fc1"]]


def test_later_blocks_see_the_inputs_of_the_pruned_earlier_blocks(model, loader):
    layers = prunable_linears(model, ("vision",))
    source = InputSource(model, loader, ("vision",), 12, progress=False)
    seen = {}

    def halve(name, weight, sq_norm):  # a stand-in pruner: record the statistic, zero the first half
        seen[name] = sq_norm
        out = weight.clone()
        out[:, : weight.shape[1] // 2] = 0
        return out.float()

    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    new = prune_sequentially(list(layers), source, "sq_norm", halve, desc="test")
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())  # source untouched
    assert source.passes == len(block_groups(layers))
    # block 1's inputs: the model with block 0 (only) replaced by its new weights
    pruned_block0 = model.copy()
    apply_weights(pruned_block0, {n: w for n, w in new.items() if n.startswith("vision.0.")}, ("vision",))
    block1 = {n: l for n, l in prunable_linears(pruned_block0, ("vision",)).items() if n.startswith("vision.1.")}
    x = captured_inputs(pruned_block0, loader, block1, 12)
    for name in block1:
        torch.testing.assert_close(seen[name], (x[name] ** 2).sum(0), rtol=1e-10, atol=1e-8)
    dense = captured_inputs(model, loader, {"vision.1.fc1": layers["vision.1.fc1"]}, 12)["vision.1.fc1"]
    assert not torch.allclose(seen["vision.1.fc1"], (dense ** 2).sum(0))


def test_a_bypassed_layer_is_an_error_naming_it(model, loader):
    work = model.copy()
    layers = prunable_linears(work, ("vision",))
    source = InputSource(work, loader, ("vision",), 12, progress=False)
    stray = torch.nn.Linear(4, 4)  # never called by the model
    with pytest.raises(ClipPruneError, match="layer vision.9.fc1 was never called in calibration batch 0"):
        source.statistics(work, {"vision.0.fc1": layers["vision.0.fc1"], "vision.9.fc1": stray}, "gram")
