"""adaptive (AMP): the threshold rule on the held-out loss, replay correctness, extremes, determinism, errors."""
import json

import pytest
import torch

from clipprune.errors import MaskError, ModelLoadError, ParamError
from clipprune.models import apply_masks, full_masks
from clipprune.scoring import get_loss
from clipprune.search import get_search, mask_summary
from clipprune.report.plots import plot_search_trace

from models import sample_inputs, single_thread_fixture, tiny_model

single_thread = single_thread_fixture()
FAMILIES = ["open_clip", "hf"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def holdout(model, sizes=(4, 4, 3), seed=1):
    images, tokens = sample_inputs(model, batch=sum(sizes), seed=seed)
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], tokens[start:start + size]))
        start += size
    return out


def neuron_scores(model, tower="vision", seed=0):
    views = model.towers[tower].block_views()
    gen = torch.Generator().manual_seed(seed)
    return {f"{tower}.neuron": torch.rand(len(views), max(v.ffn_dim for v in views), generator=gen)}


def views_of(model, towers=("vision",)):
    return {t: model.towers[t].block_views() for t in towers}


def run(model, thresh, halvings=6, scores=None, data=None, **options):
    report = {}
    masks = get_search("adaptive")(scores or neuron_scores(model), views_of(model), 0.5, "mac", model=model,
                                   holdout=data or holdout(model), report=report, loss_inc_thresh=thresh,
                                   halvings=halvings, progress=False, **options)
    return masks, report


def plain_loss(model, masks, data, batch_size=32, tau_inv=20.0):
    """The held-out entropy with ordinary masked forwards of the whole model (no replay, no caching)."""
    images = torch.cat([b[0] for b in data])
    total = 0.0
    with torch.no_grad(), apply_masks(model, masks):
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size]
            total += float(get_loss("entropy")(model.encode_image(chunk), None, None, inv_temperature=tau_inv)) \
                * chunk.shape[0]
    return total / images.shape[0]


def test_threshold_rule_and_losses_from_plain_forwards(model):
    data = holdout(model)
    scores = neuron_scores(model)
    thresh = 0.01
    masks, report = run(model, thresh, halvings=4, scores=scores, data=data)
    views = views_of(model)["vision"]
    assert [e["layer"] for e in report["layers"]] == list(reversed(range(len(views))))  # last block first
    state = {k: v.clone() for k, v in full_masks(model, ("vision",)).items()}
    assert report["dense_loss"] == pytest.approx(plain_loss(model, state, data), rel=1e-5)
    reference = report["dense_loss"]
    for entry in report["layers"]:
        layer, width = entry["layer"], entry["width"]
        order = torch.argsort(-scores["vision.neuron"][layer, :width], stable=True)
        assert entry["loss_before"] == pytest.approx(reference, rel=1e-6)
        accepted = [c["width"] for c in entry["candidates"] if c["accepted"]]
        for c in entry["candidates"]:
            trial = {k: v.clone() for k, v in state.items()}
            trial["vision.neuron"][layer, :width] = 0.0
            trial["vision.neuron"][layer, order[:c["width"]]] = 1.0
            # the replayed (cached-input) loss equals an ordinary forward of the masked model
            assert c["loss"] == pytest.approx(plain_loss(model, trial, data), rel=1e-5, abs=1e-7)
            assert c["accepted"] == (c["loss"] - reference <= thresh + 1e-9)
        assert entry["accepted_width"] == (min(accepted) if accepted else width)
        # binary search: each candidate halves the interval left by the previous answers
        left, right = 0, width
        for c in entry["candidates"]:
            assert c["width"] == (left + right) // 2
            left, right = (left, c["width"]) if c["accepted"] else (c["width"], right)
        state["vision.neuron"][layer, :width] = 0.0
        state["vision.neuron"][layer, order[:entry["accepted_width"]]] = 1.0
        reference = entry["loss_after"]
    torch.testing.assert_close(masks["vision.neuron"], state["vision.neuron"])
    assert torch.equal(masks["vision.head"], full_masks(model, ("vision",))["vision.head"])  # heads all kept
    assert report["final_loss"] == pytest.approx(plain_loss(model, state, data), rel=1e-5)


def test_huge_threshold_prunes_to_the_minimum(model):
    halvings = 3
    masks, report = run(model, 1e9, halvings=halvings)
    for entry, kept in zip(report["layers"], reversed(masks["vision.neuron"].sum(1).tolist())):
        assert all(c["accepted"] for c in entry["candidates"])
        assert entry["accepted_width"] == kept == entry["width"] >> halvings


def test_zero_threshold_never_lets_the_loss_rise(model):
    masks, report = run(model, 0.0, halvings=3)
    for entry in report["layers"]:
        assert all((c["increase"] <= 0) == c["accepted"] for c in entry["candidates"])
        if not any(c["accepted"] for c in entry["candidates"]):
            assert entry["accepted_width"] == entry["width"]
    assert report["final_loss"] <= report["dense_loss"] + 1e-9
    huge, _ = run(model, 1e9, halvings=3)
    assert masks["vision.neuron"].sum() > huge["vision.neuron"].sum()


def test_deterministic_and_model_restored(model):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    a_masks, a_report = run(model, 0.02, halvings=3)
    b_masks, b_report = run(model, 0.02, halvings=3)
    assert all(torch.equal(a_masks[k], b_masks[k]) for k in a_masks)
    assert json.dumps(a_report, sort_keys=True) == json.dumps(b_report, sort_keys=True)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__
               for m in model.module.modules())
    summary = mask_summary(a_masks, views_of(model))
    assert 0 < summary["kept_fraction"] <= 1


def test_image_text_loss_can_search_the_text_tower(model):
    scores = {**neuron_scores(model, "vision"), **neuron_scores(model, "text", seed=1)}
    views = views_of(model, ("vision", "text"))
    report = {}
    masks = get_search("adaptive")(scores, views, 0.5, model=model, holdout=holdout(model), report=report,
                                   loss_inc_thresh=1e9, halvings=2, loss="entropy_image_text", progress=False)
    assert set(masks) == {"vision.head", "vision.neuron", "text.head", "text.neuron"}
    assert [e["tower"] for e in report["layers"]][0] == "vision" and report["layers"][-1]["tower"] == "text"
    with pytest.raises(ParamError, match=r"search\.options\.loss=entropy reads images only"):
        get_search("adaptive")(scores, views, 0.5, model=model, holdout=holdout(model), progress=False)


# the option values are checked with params.yaml (tests/test_config.py); the registry rejects unknown names
@pytest.mark.parametrize("options, match", [
    ({"budget": 3}, r"^search\.options: unknown option\(s\) budget for method 'adaptive'"),
])
def test_bad_options_one_line(model, options, match):
    with pytest.raises(ParamError, match=match) as info:
        get_search("adaptive")(neuron_scores(model), views_of(model), 0.5, model=model, holdout=holdout(model),
                               progress=False, **options)
    assert "\n" not in str(info.value)


def test_needs_model_and_neuron_scores(model):
    search = get_search("adaptive")
    assert search.needs_model and not get_search("mac").needs_model
    with pytest.raises(ParamError, match="search.method=adaptive .* needs the model and held-out data"):
        search(neuron_scores(model), views_of(model), 0.5)
    views = views_of(model)["vision"]
    heads_only = {"vision.head": torch.rand(len(views), views[0].num_heads)}
    with pytest.raises(MaskError, match="needs neuron scores"):
        search(heads_only, views_of(model), 0.5, model=model, holdout=holdout(model), progress=False)
    # mac is untouched by the context arguments: it neither needs nor accepts them as options
    scores = {**neuron_scores(model), **heads_only}
    plain = get_search("mac")(scores, views_of(model), 0.5)
    with_model = get_search("mac")(scores, views_of(model), 0.5, model=model, holdout=[], report={})
    assert all(torch.equal(plain[k], with_model[k]) for k in plain)
    with pytest.raises(ParamError, match="unknown option"):
        get_search("mac")(scores, views_of(model), 0.5, halvings=3)


def test_a_replay_that_does_not_reproduce_the_model_stops_the_search(model, monkeypatch):
    """The blocks-plus-tail replay is checked against encode_image before any width is tried."""
    real = type(model).tower_output
    monkeypatch.setattr(type(model), "tower_output", lambda self, tower, hidden, inputs:
                        real(self, tower, hidden, inputs) * 1.01)
    with pytest.raises(ModelLoadError, match=r"^test:\w+: the vision tower's blocks and tail \(tower_output\) do not "
                                             r"reproduce encode_image \(max abs error .*\); the adaptive search"):
        run(model, 0.02)


def test_tail_batch_of_one_joins_the_previous_batch(model):
    data = holdout(model, sizes=(5,))
    masks_a, report_a = run(model, 1e9, halvings=2, data=data, batch_size=4)  # 4 + 1 -> one batch of 5
    masks_b, report_b = run(model, 1e9, halvings=2, data=data, batch_size=5)
    assert report_a["dense_loss"] == report_b["dense_loss"] and report_a["holdout_samples"] == 5


def test_plot_trace(model, tmp_path):
    _, report = run(model, 0.01, halvings=2)
    plot_search_trace(report, tmp_path / "trace.png")
    plot_search_trace({"method": "mac", "layers": []}, tmp_path / "none.png")
    for name in ("trace.png", "none.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (tmp_path / "trace.png").read_bytes()
    plot_search_trace(report, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").read_bytes() == first  # byte-stable for equal traces
