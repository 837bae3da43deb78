"""LFPR's label-free criterion (max image-text logit), its loss, and the absolute-gradient criterion."""
import json

import pytest
import torch
import torch.nn.functional as F

from clipprune.errors import ParamError
from clipprune.models import apply_masks, full_masks, load_model
from clipprune.scoring import get_criterion, get_loss, score_model

from models import sample_inputs, single_thread_fixture, tiny_model

from . import batches, write_fixture_model

FAMILIES = ["open_clip", "hf"]
KEYS = ["vision.head", "vision.neuron", "text.head", "text.neuron"]

single_thread = single_thread_fixture()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def direct_max_logit_grads(model, images, text_tokens, towers, per_class=1):
    """∂/∂mask of Σ_images max_text scale·cos(image, text), written out with plain autograd."""
    masks = full_masks(model, towers, requires_grad=True)
    with apply_masks(model, masks):
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(text_tokens), dim=-1)
    if per_class > 1:
        text = F.normalize(text.view(-1, per_class, text.shape[-1]).mean(1), dim=-1)
    logits = model.logit_scale.detach() * image @ text.T
    value = torch.stack([row.max() for row in logits]).sum()
    keys = list(masks)
    return dict(zip(keys, torch.autograd.grad(value, [masks[k] for k in keys])))


def test_batch_scores_equal_direct_autograd(model):
    loader = batches(model, sizes=(3, 3, 2))
    result = get_criterion("label_free")(model, loader, towers="both", granularity="batch")
    expected = {key: torch.zeros(result.scores[key].shape, dtype=torch.float64) for key in KEYS}
    for index, (images, tokens) in enumerate(loader):
        grads = direct_max_logit_grads(model, images, tokens, ("vision", "text"))
        for key in KEYS:
            assert grads[key].abs().sum() > 0, key
            expected[key] += grads[key].double() ** 2
            torch.testing.assert_close(result.grads[key + ".grads"][index], grads[key], atol=1e-5, rtol=1e-4)
    for key in KEYS:
        torch.testing.assert_close(result.scores[key], expected[key].float(), atol=1e-8, rtol=1e-4)
    assert result.meta["criterion"] == "label_free" and result.meta["loss"] == "max_logit"
    assert result.meta["num_samples"] == 8 and result.meta["num_batches"] == 3
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.module.modules())


def test_scores_do_not_depend_on_which_caption_is_paired_with_which_image(model):
    loader = batches(model, sizes=(4, 4), seed=5)
    shuffled = [(images, tokens[torch.tensor([2, 0, 3, 1])]) for images, tokens in loader]
    paired = get_criterion("label_free")(model, loader, towers="both")
    unpaired = get_criterion("label_free")(model, shuffled, towers="both")
    for key in KEYS:
        torch.testing.assert_close(paired.scores[key], unpaired.scores[key], atol=1e-7, rtol=1e-4)
    # the contrastive Fisher does use the pairing as a label: the same shuffle changes its scores
    fisher = [get_criterion("fisher")(model, data, towers="both", loss="contrastive") for data in (loader, shuffled)]
    assert not torch.allclose(fisher[0].scores["vision.head"], fisher[1].scores["vision.head"], rtol=1e-2)


def test_sample_rows_add_up_to_the_batch_row(model):
    loader = batches(model, sizes=(3, 2))
    per_batch = get_criterion("label_free")(model, loader, towers="both", granularity="batch")
    per_sample = get_criterion("label_free")(model, loader, towers="both", granularity="sample")
    for key in KEYS:
        rows = per_sample.grads[key + ".grads"]
        assert rows.shape[0] == 5
        torch.testing.assert_close(per_sample.scores[key], rows.double().pow(2).sum(0).float())
        batch_rows = per_batch.grads[key + ".grads"]
        torch.testing.assert_close(rows[:3].sum(0), batch_rows[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rows[3:].sum(0), batch_rows[1], atol=1e-5, rtol=1e-4)


def test_keep_grads_false_and_score_model_path(model):
    loader = batches(model, sizes=(2, 2))
    full = score_model(model, loader, criterion="label_free", loss="contrastive", towers="vision", progress=False)
    bare = get_criterion("label_free")(model, loader, towers="vision", keep_grads=False)
    assert bare.grads == {} and sorted(full.grads) == ["vision.head.grads", "vision.neuron.grads"]
    for key in full.scores:
        assert torch.equal(full.scores[key], bare.scores[key])
    assert full.meta["loss"] == "max_logit" and full.meta["seed"] == 0  # score.loss is not used


# ---------------------------------------------------------------------------------------------
# class prompts as the text set
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_free")
    write_fixture_model(root / "fixtures" / "tiny")
    (root / "classnames.json").write_text(json.dumps(["zero", "one", "two"]))
    (root / "templates.json").write_text(json.dumps(["a photo of {c}.", "the digit {c}"]))
    return root


@pytest.fixture()
def tokenizing_model(prompt_setup, monkeypatch):
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(prompt_setup / "fixtures"))
    return load_model("fixture:tiny")


@pytest.mark.parametrize("towers", ["vision", "both"])
def test_prompt_text_set_equals_the_zero_shot_classifier_computation(prompt_setup, tokenizing_model, towers):
    model = tokenizing_model
    images, _ = sample_inputs(model, batch=5, seed=2)
    loader = [(images[:3], ["x"] * 3), (images[3:], ["y"] * 2)]
    options = {"text_set": "prompts", "classnames": str(prompt_setup / "classnames.json"),
               "templates": str(prompt_setup / "templates.json")}
    result = get_criterion("label_free")(model, loader, towers=towers, **options)
    prompts = [t.format(c=c) for c in ["zero", "one", "two"] for t in ["a photo of {c}.", "the digit {c}"]]
    tokens = model.tokenizer(prompts)
    names = ("vision",) if towers == "vision" else ("vision", "text")
    expected = {}
    for chunk in (images[:3], images[3:]):
        for key, grad in direct_max_logit_grads(model, chunk, tokens, names, per_class=2).items():
            expected[key] = expected.get(key, 0) + grad.double() ** 2
    assert sorted(result.scores) == sorted(expected)
    for key in expected:
        assert expected[key].sum() > 0, key
        torch.testing.assert_close(result.scores[key], expected[key].float(), atol=1e-8, rtol=1e-4)
    assert result.meta["num_classes"] == 3 and result.meta["num_templates"] == 2
    # a single image per batch is fine here: the candidates are the classes, not captions
    single = get_criterion("label_free")(model, [(images[:1], ["x"])], towers="vision", granularity="sample",
                                         **options)
    assert single.grads["vision.head.grads"].shape[0] == 1


# ---------------------------------------------------------------------------------------------
# the loss and bad options
# ---------------------------------------------------------------------------------------------
def test_max_logit_loss_is_the_mean_top_logit_and_ignores_text_order():
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(4, 6, generator=gen), torch.randn(5, 6, generator=gen)
    loss = get_loss("max_logit")
    logits = 10.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(loss(image, text, 10.0), logits.max(1).values.mean())
    torch.testing.assert_close(loss(image, text.flip(0), 10.0), loss(image, text, 10.0))
    assert get_loss("max_logit").uses_text and get_loss("max_logit").min_batch == 2
    with pytest.raises(ParamError, match="texts_per_class=2 does not divide the 5"):
        loss(image, text, 10.0, texts_per_class=2)


# option values and their combinations are checked with params.yaml (tests/test_config.py); the registry
# still rejects an option the criterion does not take
@pytest.mark.parametrize("options, granularity, towers, message", [
    ({"inv_temperature": 10}, "batch", "vision", r"unknown option\(s\) inv_temperature for criterion 'label_free'"),
])
def test_bad_options_are_one_line_param_errors(model, options, granularity, towers, message):
    with pytest.raises(ParamError, match=message) as info:
        get_criterion("label_free")(model, batches(model), towers=towers, granularity=granularity, **options)
    assert "\n" not in str(info.value)


def test_data_errors(model):
    with pytest.raises(ParamError, match="score.criterion=label_free needs calibration data"):
        get_criterion("label_free")(model, None)
    with pytest.raises(ParamError, match=r"^score.batch_size: batch 1 holds 1 image\(s\)"):
        get_criterion("label_free")(model, batches(model, sizes=(2, 1)))
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# absolute gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss, granularity", [("contrastive", "batch"), ("max_logit", "sample")])
def test_abs_gradient_sums_absolute_fisher_rows(model, loss, granularity):
    loader = batches(model, sizes=(3, 2))
    fisher = get_criterion("fisher")(model, loader, towers="both", loss=loss, granularity=granularity)
    absolute = get_criterion("abs_gradient")(model, loader, towers="both", loss=loss, granularity=granularity)
    assert absolute.meta["criterion"] == "abs_gradient" and absolute.meta["loss"] == loss
    for key in KEYS:
        rows = fisher.grads[key + ".grads"]
        assert torch.equal(absolute.grads[key + ".grads"], rows)
        torch.testing.assert_close(absolute.scores[key], rows.double().abs().sum(0).float())
        assert not torch.allclose(absolute.scores[key], fisher.scores[key])
    bare = get_criterion("abs_gradient")(model, loader, towers="vision", loss="entropy", keep_grads=False,
                                         inv_temperature=15.0)
    assert bare.grads == {} and bare.meta["loss_options"] == {"inv_temperature": 15.0}
    with pytest.raises(ParamError, match="unknown option.*for loss 'contrastive'"):
        get_criterion("abs_gradient")(model, loader, loss="contrastive", inv_temperature=10.0)
    with pytest.raises(ParamError, match="score.criterion=abs_gradient needs calibration data"):
        get_criterion("abs_gradient")(model, None)
