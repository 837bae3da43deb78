"""Fisher scoring: per-sample masks, per-sample and per-batch gradients checked by independent computations."""
import pytest
import torch
import torch.nn.functional as F

from clipprune.errors import ClipPruneError, MaskError, ParamError
from clipprune.models import apply_masks, full_masks
from clipprune.models.masks import apply_sample_masks
from clipprune.scoring import get_criterion, mask_gradients, score_model
from clipprune.scoring.fisher import frozen_parameters

from models import random_masks, sample_inputs, single_thread_fixture, tiny_model

from . import batches

FAMILIES = ["open_clip", "hf"]
KEYS = ["vision.head", "vision.neuron", "text.head", "text.neuron"]

single_thread = single_thread_fixture()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def clip_loss(image, text, scale):
    """Symmetric InfoNCE written out independently of the library (open_clip's ClipLoss)."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)


def test_sample_masks_scale_each_sample_by_its_own_mask(model):
    images, tokens = sample_inputs(model, batch=3)
    per_sample = [random_masks(model, seed=s, real_valued=True) for s in range(3)]
    stacked = {k: torch.stack([m[k] for m in per_sample]) for k in KEYS}
    with torch.no_grad(), apply_sample_masks(model, stacked):
        image_features, text_features = model.encode_image(images), model.encode_text(tokens)
    for b, masks in enumerate(per_sample):
        with torch.no_grad(), apply_masks(model, masks):
            ref_image = model.encode_image(images[b:b + 1])
            ref_text = model.encode_text(tokens[b:b + 1])
        torch.testing.assert_close(image_features[b:b + 1], ref_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text_features[b:b + 1], ref_text, atol=1e-5, rtol=1e-5)
    assert all(not m._forward_pre_hooks for m in model.module.modules())


def test_sample_mask_errors(model):
    images, _ = sample_inputs(model, batch=2)
    masks = {k: v.unsqueeze(0).repeat(3, 1, 1) for k, v in full_masks(model, ("vision",)).items()}
    with pytest.raises(MaskError, match="hold 3 samples"):
        with apply_sample_masks(model, masks):
            model.encode_image(images)
    with pytest.raises(MaskError, match=r"\[batch, layers, units\]"):
        with apply_sample_masks(model, full_masks(model, ("vision",))):
            pass
    bad = dict(masks)
    bad["vision.head"] = bad["vision.head"][:2]
    with pytest.raises(MaskError, match="disagree on the batch size"):
        with apply_sample_masks(model, bad):
            pass
    nan = {k: v.clone() for k, v in masks.items()}
    nan["vision.neuron"][2, 0, 0] = float("nan")
    with pytest.raises(MaskError, match="non-finite"):
        with apply_sample_masks(model, nan):
            pass
    assert all(not m._forward_pre_hooks for m in model.module.modules())


def own_path_gradient(model, images, tokens, b, loss):
    """∂(batch × loss)/∂mask through sample b only: the other samples' features are constants.

    Sample b is re-encoded alone with ordinary 2-D mask leaves (one backward per sample), an independent
    route to what the 3-D-mask trick computes in one backward for the whole batch.
    """
    with torch.no_grad():
        image_all, text_all = model.encode_image(images), model.encode_text(tokens)
    towers = ("vision", "text") if loss == "contrastive" else ("vision",)
    masks = full_masks(model, towers, requires_grad=True)
    with apply_masks(model, masks):
        image_b = model.encode_image(images[b:b + 1])
        text_b = model.encode_text(tokens[b:b + 1])
    image = torch.cat([image_all[:b], image_b, image_all[b + 1:]])
    text = torch.cat([text_all[:b], text_b, text_all[b + 1:]])
    scale = model.logit_scale.detach()
    if loss == "contrastive":
        value = clip_loss(image, text, scale)
    else:  # entropy written out: mean row entropy of softmax(scale cos) without the diagonal
        z = F.normalize(image, dim=-1)
        logits = scale * z @ z.T
        rows = []
        for i in range(len(z)):
            p = torch.softmax(torch.cat([logits[i, :i], logits[i, i + 1:]]), dim=0)
            rows.append(-(p * p.log()).sum())
        value = torch.stack(rows).mean()
    keys = list(masks)
    grads = torch.autograd.grad(value * len(images), [masks[k] for k in keys])
    return dict(zip(keys, grads))


@pytest.mark.parametrize("loss", ["contrastive", "entropy"])
def test_per_sample_gradients_equal_a_backward_per_sample(model, loss):
    images, tokens = sample_inputs(model, batch=4, seed=3)
    towers = ("vision", "text") if loss == "contrastive" else ("vision",)
    with frozen_parameters(model):
        _, rows = mask_gradients(model, images, tokens, loss, towers, per_sample=True)
        _, batch_grad = mask_gradients(model, images, tokens, loss, towers, per_sample=False)
        for b in range(len(images)):
            expected = own_path_gradient(model, images, tokens, b, loss)
            for key, grad in expected.items():
                assert grad.abs().sum() > 0, key
                torch.testing.assert_close(rows[key][b], grad, atol=1e-5, rtol=1e-4)
    for key in rows:  # the sample rows add up to the (summed-loss) batch gradient
        torch.testing.assert_close(rows[key].sum(0), len(images) * batch_grad[key], atol=1e-5, rtol=1e-4)


def test_batch_fisher_equals_sum_of_squared_batch_gradients(model):
    loader = batches(model, sizes=(3, 3, 2))
    result = get_criterion("fisher")(model, loader, towers="both", loss="contrastive", granularity="batch")
    expected = {key: torch.zeros_like(result.scores[key], dtype=torch.float64) for key in KEYS}
    for index, (images, tokens) in enumerate(loader):
        masks = full_masks(model, requires_grad=True)
        with apply_masks(model, masks):
            value = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale)
        value.backward()
        for key in KEYS:
            expected[key] += masks[key].grad.double() ** 2
            torch.testing.assert_close(result.grads[key + ".grads"][index], masks[key].grad, atol=1e-6, rtol=1e-5)
    model.module.zero_grad(set_to_none=True)  # the manual reference did accumulate parameter grads
    for key in KEYS:
        torch.testing.assert_close(result.scores[key], expected[key].float(), atol=1e-10, rtol=1e-5)
        assert result.grads[key + ".grads"].shape[0] == 3
    assert result.meta["num_samples"] == 8 and result.meta["num_batches"] == 3
    assert result.meta["criterion"] == "fisher" and result.meta["wall_time_s"] >= 0


def test_sample_fisher_is_sum_of_squared_rows(model):
    loader = batches(model, sizes=(3, 2))
    result = get_criterion("fisher")(model, loader, towers="vision", loss="entropy", granularity="sample")
    assert sorted(result.scores) == ["vision.head", "vision.neuron"]
    for key in result.scores:
        rows = result.grads[key + ".grads"]
        assert rows.shape[0] == 5 and rows.dtype == torch.float32
        torch.testing.assert_close(result.scores[key], rows.double().pow(2).sum(0).float())
    no_rows = get_criterion("fisher")(model, loader, towers="vision", loss="entropy", granularity="sample",
                                      keep_grads=False)
    assert no_rows.grads == {}
    for key in result.scores:
        assert torch.equal(no_rows.scores[key], result.scores[key])


def test_parameters_untouched_and_flags_restored():
    model = tiny_model("open_clip")
    params = dict(model.module.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    frozen_by_user = "visual.conv1.weight"
    params[frozen_by_user].requires_grad_(False)
    model.module.train()
    score_model(model, batches(model), criterion="fisher", towers="both", granularity="sample", progress=False)
    assert model.module.training
    for name, p in params.items():
        assert p.grad is None, name
        assert p.requires_grad == (name != frozen_by_user), name
        assert torch.equal(p.detach(), before[name]), name


def test_same_seed_and_data_give_bit_identical_scores():
    runs = []
    for _ in range(2):
        model = tiny_model("hf")
        runs.append(score_model(model, batches(model), criterion="fisher", granularity="sample", progress=False))
    for key, value in runs[0].tensors().items():
        assert torch.equal(value, runs[1].tensors()[key]), key


def test_entropy_cannot_score_the_text_tower(model):
    for towers in ("text", "both"):
        with pytest.raises(ParamError, match=f"score.towers={towers} needs a loss that uses the captions"):
            get_criterion("fisher")(model, batches(model), towers=towers, loss="entropy")


def test_non_finite_gradient_names_the_batch(model):
    loader = batches(model, sizes=(2, 2, 2))
    images, tokens = loader[1]
    loader[1] = (torch.full_like(images, float("nan")), tokens)
    with pytest.raises(ClipPruneError, match=r"^score: non-finite gradient in batch 1 \(loss=nan\)") as info:
        get_criterion("fisher")(model, loader, towers="both", loss="contrastive")
    assert "\n" not in str(info.value)
    assert all(not m._forward_pre_hooks for m in model.module.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_fisher_option_and_data_errors(model):
    with pytest.raises(ParamError, match="unknown option.*for loss 'contrastive'"):
        get_criterion("fisher")(model, batches(model), loss="contrastive", inv_temperature=10.0)
    with pytest.raises(ParamError, match="needs calibration data"):
        get_criterion("fisher")(model, None)
    with pytest.raises(ClipPruneError, match="no batches"):
        get_criterion("fisher")(model, [])


# ---------------------------------------------------------------------------------------------
# no made-up zero scores: a mask cut off from the loss stops scoring, naming the mask key
# ---------------------------------------------------------------------------------------------
def bypass_mlp(model, tower: str, layer: int) -> None:
    """Make the MLP of ``layer`` apply its second linear functionally: the neuron mask's hook point (the
    input of that linear) is never called, so the mask entries of that layer are cut off from the loss."""
    mlp = model.towers[tower].mlp(layer)
    if model.family == "open_clip":
        first, act, second = mlp.c_fc, mlp.gelu, mlp.c_proj
    else:
        first, act, second = mlp.fc1, mlp.activation_fn, mlp.fc2
    mlp.forward = lambda x: F.linear(act(first(x)), second.weight, second.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_cut_off_from_the_loss_names_the_mask_and_the_layer(family):
    model = tiny_model(family)
    images, _ = sample_inputs(model, batch=2)
    with torch.no_grad():
        before = model.encode_image(images)
        bypass_mlp(model, "vision", 1)
        torch.testing.assert_close(model.encode_image(images), before)  # the same function, hook bypassed
    with pytest.raises(ClipPruneError, match=r"^score: mask vision\.neuron layer 1 received an identically zero "
                                             r"gradient in all 3 calibration batches .*would all score 0 and be "
                                             r"pruned first$") as info:
        get_criterion("fisher")(model, batches(model), towers="vision", loss="contrastive", granularity="batch")
    assert "\n" not in str(info.value)
    # the same check guards every criterion built on the shared gradient loop
    with pytest.raises(ClipPruneError, match=r"mask vision\.neuron layer 1 received an identically zero"):
        get_criterion("taylor_entropy")(model, batches(model), towers="vision", loss="entropy",
                                        granularity="sample")


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_a_mask_that_gets_no_gradient_at_all_names_the_mask_and_the_batch(granularity):
    model = tiny_model("open_clip")
    for layer in range(len(model.towers["text"].blocks())):
        bypass_mlp(model, "text", layer)
    with pytest.raises(ClipPruneError, match=r"^score: mask text\.neuron received no gradient in calibration "
                                             r"batch 0 \(none of its hook points ran"):
        get_criterion("fisher")(model, batches(model), towers="both", loss="contrastive", granularity=granularity)


def test_a_dead_unit_scores_zero_but_a_mask_without_units_is_empty():
    """Decisions: a single head that cannot influence the output (zero value rows) scores exactly 0 and is
    pruned first — correct, removing it costs nothing; a mask kind with no units left (every attention
    sub-block already pruned away) has nothing to score and yields an empty [layers, 0] score."""
    from clipprune.models.prune import prune_model

    model = tiny_model("hf")
    attention = model.towers["vision"].attention(0)
    head_dim = model.towers["vision"].head_dim
    with torch.no_grad():
        attention.v_proj.weight[:head_dim] = 0
        attention.v_proj.bias[:head_dim] = 0
    result = get_criterion("fisher")(model, batches(model), towers="vision", loss="contrastive")
    assert result.scores["vision.head"][0, 0] == 0
    assert bool((result.scores["vision.head"][0, 1:] > 0).all()) and bool((result.scores["vision.neuron"] > 0).all())

    masks = full_masks(model, ("vision",))
    masks["vision.head"] = torch.zeros_like(masks["vision.head"])  # drop every vision attention sub-block
    pruned = prune_model(model, masks)
    result = get_criterion("fisher")(pruned, batches(pruned), towers="vision", loss="contrastive")
    layers = len(pruned.towers["vision"].blocks())
    assert result.scores["vision.head"].shape == (layers, 0)
    assert result.scores["vision.neuron"].shape == masks["vision.neuron"].shape
    assert bool((result.scores["vision.neuron"] > 0).all())
