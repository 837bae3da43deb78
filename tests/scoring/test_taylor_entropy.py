"""taylor_entropy (AMP): scores equal a direct autograd computation on the MLP activations; label-free."""
import pytest
import torch
import torch.nn.functional as F

from clipprune.errors import ParamError
from clipprune.scoring import available_losses, get_criterion, get_loss, score_model
from clipprune.scoring.taylor_entropy import scored_only

from models import single_thread_fixture, tiny_model

from . import batches

single_thread = single_thread_fixture()
FAMILIES = ["open_clip", "hf"]
TAU_INV = 20.0


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def entropy_image_image(features, tau_inv):
    """Mean row entropy of softmax(τ⁻¹ cos(z_i, z_k)), k ≠ i, written out independently of the library."""
    z = features / features.norm(dim=-1, keepdim=True)
    logits = tau_inv * z @ z.T
    n = z.shape[0]
    rows = []
    for i in range(n):
        others = torch.cat([logits[i, :i], logits[i, i + 1:]])
        p = torch.softmax(others, dim=0)
        rows.append(-(p * torch.log(p)).sum())
    return torch.stack(rows).mean()


def direct_taylor(model, data, per_sample, tau_inv=TAU_INV):
    """AMP's I_j from the activations themselves: hooks keep the fc2 input and its gradient."""
    tower = model.towers["vision"]
    layers = len(tower.blocks())
    totals, count = torch.zeros(layers, tower.block_view(0).ffn_dim, dtype=torch.float64), 0
    for images, _ in data:
        captured = {}

        def keep(layer):
            def hook(module, args):
                args[0].retain_grad()
                captured[layer] = args[0]
            return hook

        handles = [tower.mlp_out_module(i).register_forward_pre_hook(keep(i)) for i in range(layers)]
        try:
            loss = entropy_image_image(model.encode_image(images), tau_inv)
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        for layer, act in captured.items():
            product = (act.detach() * act.grad).double()  # [batch, tokens, ffn] (batch first)
            per = product.sum(dim=1) if per_sample else product.sum(dim=(0, 1))[None]
            totals[layer] += per.abs().sum(0)
        count += images.shape[0] if per_sample else 1
        model.module.zero_grad(set_to_none=True)
    return (totals / count).float()


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_scores_equal_direct_autograd(model, granularity):
    data = batches(model, sizes=(3, 4))
    result = score_model(model, data, criterion="taylor_entropy", loss="entropy", granularity=granularity,
                         towers="vision", progress=False, options={"inv_temperature": TAU_INV})
    expected = direct_taylor(model, data, per_sample=granularity == "sample")
    torch.testing.assert_close(result.scores["vision.neuron"], expected, rtol=1e-4, atol=1e-9)
    assert float(expected.abs().max()) > 0  # the comparison is not vacuous


def test_entropy_matches_independent_formula(model):
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    value = get_loss("entropy")(features, None, None, inv_temperature=TAU_INV)
    torch.testing.assert_close(value, entropy_image_image(features, TAU_INV))


def test_heads_unscored_and_dropped(model):
    data = batches(model, sizes=(3, 3))
    result = score_model(model, data, criterion="taylor_entropy", loss="entropy", granularity="sample",
                         towers="vision", progress=False)
    layers = len(model.towers["vision"].blocks())
    assert result.scores["vision.head"].shape == (layers, 0)
    assert result.meta["unscored"] == ["vision.head"]
    assert result.meta["loss_options"] == {"inv_temperature": 20.0}  # AMP's τ⁻¹ unless set
    assert set(scored_only(result.scores, result.meta)) == {"vision.neuron"}
    # signed per-sample rows for the tune stage's rearrangement, same convention as fisher
    assert set(result.grads) == {"vision.neuron.grads"}
    assert result.grads["vision.neuron.grads"].shape[0] == 6
    fisher = score_model(model, data, criterion="fisher", loss="entropy", granularity="sample", towers="vision",
                         progress=False, options={"inv_temperature": 20.0})
    torch.testing.assert_close(result.grads["vision.neuron.grads"], fisher.grads["vision.neuron.grads"])
    no_grads = score_model(model, data, criterion="taylor_entropy", loss="entropy", towers="vision",
                           progress=False, options={"keep_grads": False})
    assert no_grads.grads == {}


def test_captions_do_not_change_image_scores(model):
    images = batches(model, sizes=(3, 3))
    words = [(i, ["a red digit", "one", "two"]) for i, _ in images]
    other = [(i, ["something else entirely", "x", "seven seven"]) for i, _ in images]
    scores = [score_model(model, data, criterion="taylor_entropy", loss="entropy", granularity="sample",
                          towers="vision", progress=False).scores["vision.neuron"] for data in (images, words, other)]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_image_text_variant_ignores_the_pairing(model):
    """Label-free: permuting which caption goes with which image inside a batch leaves the scores alone."""
    assert "entropy_image_text" in available_losses()
    data = batches(model, sizes=(4,))
    permuted = [(images, tokens[[2, 0, 3, 1]]) for images, tokens in data]
    a, b = (score_model(model, d, criterion="taylor_entropy", loss="entropy_image_text", granularity="sample",
                        towers="both", progress=False) for d in (data, permuted))
    for key in ("vision.neuron", "text.neuron"):
        torch.testing.assert_close(a.scores[key], b.scores[key], rtol=1e-5, atol=1e-10)
        assert float(a.scores[key].abs().max()) > 0
    # the image-text loss itself averages both directions
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    logits = TAU_INV * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    rows = lambda x: -(x.softmax(-1) * x.log_softmax(-1)).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(get_loss("entropy_image_text")(image, text, None, inv_temperature=TAU_INV),
                               (rows(logits) + rows(logits.T)) / 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "contrastive"}, r"score\.loss"),
    ({"options": {"halvings": 3}}, r"score\.options: unknown option"),
    ({"towers": "both"}, r"score\.towers"),
])
def test_bad_inputs_name_the_key(model, kwargs, match):
    args = {"criterion": "taylor_entropy", "loss": "entropy", "towers": "vision", "progress": False, **kwargs}
    with pytest.raises(ParamError, match=match) as info:
        score_model(model, batches(model, sizes=(2,)), **args)
    assert "\n" not in str(info.value)


def test_registered():
    assert get_criterion("taylor_entropy").needs_data
