"""Per-sample Linear gradients: rows sum to the batch gradient; num_grads cuts the stream."""
import torch

from clipprune.scoring.losses import contrastive
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
