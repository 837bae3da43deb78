"""Bad inputs for the pruning stages (score, search, tune, export): one error line, exit 1, no outputs.

Same contract and helpers as ``test_bad_inputs.py``: subprocess cases run ``stages/<stage>.py`` in ONE
throwaway copy of the repo in which download, calibrate, score, search, tune and export already ran (64
calibration pairs, so every out exists and a failed stage can be seen not to touch it). Each case edits only
what it needs (params keys, a planted or moved-away file) and is undone after. More values of the same kinds
call the stage ``main`` in-process (fast). The subprocess cases (each starts a Python with torch and
open_clip: seconds apiece) are marked slow; the in-process ones run in ``make test-fast``.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from clipprune.params import load_params
from clipprune.tuning import TuningWarning
from pipeline_utils import copy_repo
# the shared bad-input machinery; `bad` and `call_stage` are fixtures that use this module's `repo`
from test_bad_inputs import (BadCase, bad, call_stage, empty_hf_home, mentions, tree_state)  # noqa: F401

SCORES = "artifacts/scores/scores.safetensors"
SEARCHED = "artifacts/masks/search.safetensors"
TUNED = "artifacts/masks/tuned.safetensors"
PIPELINE = ("download", "calibrate", "score", "search", "tune", "export")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The throwaway copy with every stage up to export run once (64 calibration pairs: quick)."""
    root = copy_repo(tmp_path_factory.mktemp("bad_inputs_pruning") / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["calibrate"]["num_samples"] = 64
    params["score"]["batch_size"] = 32
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_in_process(root, PIPELINE)  # one interpreter: torch and open_clip are imported once, not six times
    for out in (SCORES, SEARCHED, TUNED, "artifacts/models/pruned/model.safetensors"):
        assert (root / out).is_file(), out
    pristine = tree_state(root)
    yield root
    sizes = {k: v[:1] for k, v in tree_state(root).items()}
    assert sizes == {k: v[:1] for k, v in pristine.items()}


def run_in_process(root: Path, names) -> None:
    """Run ``stages/<name>.py:main`` for each name, in order, in this process with ``root`` as working dir."""
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        # with 64 calibration pairs a sub-block or two may keep its binary mask (a TuningWarning): fine here
        warnings.simplefilter("ignore", TuningWarning)
        patch.chdir(root)
        patch.syspath_prepend(str(root / "stages"))
        for name in names:
            spec = importlib.util.spec_from_file_location(f"_pruning_setup_{name}", root / "stages" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.main(load_params(root / "params.yaml"))


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def replace_file(bad: BadCase, rel: str, data: bytes) -> None:
    """Swap an existing out for ``data`` for the case (the original is put back after)."""
    bad.move_away(rel)
    bad.plant(rel, data)


def edited(repo, rel: str, key: str, edit) -> bytes:
    """The safetensors file ``rel`` with tensor ``key`` replaced by ``edit(tensor)`` (metadata kept)."""
    tensors, metadata = read_safetensors(repo / rel)
    tensors[key] = edit(tensors[key].clone())
    return safetensors_bytes(tensors, metadata)


def poisoned(value: float, where=(1, 2)):
    def edit(tensor):
        tensor[where] = value
        return tensor
    return edit


def wider(tensor):
    return torch.cat([tensor, torch.ones(tensor.shape[0], 1)], dim=1)


def fewer_layers(tensor):
    return tensor[:-1].contiguous()


# ---------------------------------------------------------------- search (subprocess)

@pytest.mark.slow
def test_search_constraint_above_one(bad):
    bad.set(search__constraint=1.5)
    mentions(bad.run("search"), "search.constraint must be in (0, 1], got 1.5")


@pytest.mark.slow
def test_search_method_unknown(bad):
    bad.set(search__method="greedy")
    mentions(bad.run("search"), "search.method must be one of ", "mac", "uniform", "; got 'greedy'")


@pytest.mark.slow
def test_search_scores_with_nan(bad, repo):
    replace_file(bad, SCORES, edited(repo, SCORES, "vision.head", poisoned(float("nan"))))
    mentions(bad.run("search"), SCORES, "NaN or inf", "vision.head", "layer 1")


@pytest.mark.slow
def test_search_before_score(bad):
    bad.move_away(SCORES)
    mentions(bad.run("search"), SCORES, "scores file not found (run the score stage)")


# ---------------------------------------------------------------- score (subprocess)

@pytest.mark.slow
def test_score_criterion_unknown(bad):
    bad.set(score__criterion="taylor")
    mentions(bad.run("score"), "score.criterion must be one of ", "fisher", "magnitude", "; got 'taylor'")


@pytest.mark.slow
def test_score_model_unknown(bad):
    bad.set(model="fixture:no_such_fixture")
    mentions(bad.run("score"), "fixture:no_such_fixture", "not found")


# ---------------------------------------------------------------- tune and export (subprocess)

@pytest.mark.slow
def test_tune_damp_negative(bad):
    bad.set(tune__damp=-0.1)
    mentions(bad.run("tune"), "tune.damp must be >= 0, got -0.1")


@pytest.mark.slow
def test_tune_search_mask_shape_does_not_match_model(bad, repo):
    heads = read_safetensors(repo / SEARCHED)[0]["vision.head"].shape
    replace_file(bad, SEARCHED, edited(repo, SEARCHED, "vision.head", wider))
    mentions(bad.run("tune"), SEARCHED, "vision.head has shape", f"expected {list(heads)}")


@pytest.mark.slow
def test_export_mask_file_truncated(bad, repo):
    whole = (repo / TUNED).read_bytes()
    replace_file(bad, TUNED, whole[: len(whole) // 2])
    mentions(bad.run("export"), TUNED, "not a readable safetensors mask file")


# ---------------------------------------------------------------- more values, in-process (fast)

@pytest.mark.parametrize("value, expected", [
    (0, "search.constraint must be in (0, 1], got 0"),
    (-0.1, "search.constraint must be in (0, 1], got -0.1"),
    (float("nan"), "search.constraint must be in (0, 1], got nan"),
    ("half", "search.constraint must be a number in (0, 1], got 'half' (str)"),
    (True, "search.constraint must be a number in (0, 1], got True (bool)"),
    (None, "search.constraint must be a number in (0, 1], got None (NoneType)"),
])
def test_search_constraint_variants(call_stage, value, expected):
    mentions(call_stage("search", search__constraint=value), expected)


@pytest.mark.parametrize("edits, expected", [
    ({"search__metric": "flops"}, "search.metric must be one of mac, params; got 'flops'"),
    ({"search__metric": None}, "search.metric must be one of mac, params; got None"),
    ({"search__method": 3}, "search.method must be a non-empty string, got 3"),
    ({"search__options": [1]}, "search.options must be a mapping of option names to values, got [1]"),
    ({"search__options": {"depth": 2}}, "search.options: unknown option(s) depth for method 'mac'"),
    ({"model": "fixture:no_such_fixture"}, "fixture:no_such_fixture"),
])
def test_search_param_variants(call_stage, edits, expected):
    mentions(call_stage("search", **edits), expected)


@pytest.mark.parametrize("edits, expected", [
    ({"score__loss": "mse"}, "score.loss must be one of contrastive, entropy, entropy_image_text, max_logit; got 'mse'"),
    ({"score__granularity": "token"}, "score.granularity must be one of batch, sample; got 'token'"),
    ({"score__towers": "audio"}, "score.towers must be one of vision, text, both; got 'audio'"),
    ({"score__batch_size": 0}, "score.batch_size must be >= 1, got 0"),
    ({"score__batch_size": 2.5}, "score.batch_size must be an integer, got 2.5"),
    ({"score__criterion": None}, "score.criterion must be a non-empty string, got None"),
    ({"score__options": {"temperature": 2}}, "score.options: unknown option(s) temperature"),
    ({"score__loss": "entropy", "score__towers": "text"}, "score.loss=entropy uses images only"),
    ({"model": "torchhub:clip"}, "model name 'torchhub:clip' must start with one of"),
])
def test_score_param_variants(call_stage, edits, expected):
    mentions(call_stage("score", **edits), expected)


@pytest.mark.parametrize("edits, expected", [
    ({"tune__max_scale": 0}, "tune.max_scale must be > 0, got 0"),
    ({"tune__max_scale": -1}, "tune.max_scale must be > 0, got -1"),
    ({"tune__damp": "small"}, "tune.damp must be a finite number, got 'small' (str)"),
    ({"tune__damp": float("inf")}, "tune.damp must be a finite number, got inf"),
    ({"tune__rearrange": "yes"}, "tune.rearrange must be true or false, got 'yes'"),
    ({"tune__rearrange": 1}, "tune.rearrange must be true or false, got 1"),
    ({"tune__lsq": None}, "tune.lsq must be true or false, got None"),
    ({"tune__batch_size": 0}, "tune.batch_size must be >= 1, got 0"),
])
def test_tune_param_variants(call_stage, edits, expected):
    mentions(call_stage("tune", **edits), expected)


@pytest.mark.parametrize("key, edit, expected", [
    ("vision.head", poisoned(float("inf")), "NaN or inf in vision.head (layer 1)"),
    ("vision.neuron", poisoned(float("-inf"), (0, 5)), "NaN or inf in vision.neuron (layer 0)"),
    ("vision.head", wider, "vision.head has shape"),
    ("vision.neuron", fewer_layers, "vision.neuron has shape"),
])
def test_search_scores_file_variants(call_stage, bad, repo, key, edit, expected):
    replace_file(bad, SCORES, edited(repo, SCORES, key, edit))
    mentions(call_stage("search"), SCORES, expected)


def test_search_scores_for_a_tower_the_model_lacks(call_stage, bad, repo):
    tensors, metadata = read_safetensors(repo / SCORES)
    tensors["audio.head"] = tensors.pop("vision.head")
    replace_file(bad, SCORES, safetensors_bytes(tensors, metadata))
    mentions(call_stage("search"), SCORES, "'audio.head' names tower 'audio'")


def test_search_scores_file_corrupt(call_stage, bad):
    replace_file(bad, SCORES, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    mentions(call_stage("search"), SCORES, "not a readable safetensors scores file")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_tune_gradients_not_finite(call_stage, bad, repo, value):
    replace_file(bad, SCORES, edited(repo, SCORES, "vision.head.grads", poisoned(value, (0, 1, 2))))
    mentions(call_stage("tune"), SEARCHED, SCORES, "vision.head.grads contains non-finite values")


def test_tune_without_rearrange_still_checks_the_mask_shape(call_stage, bad, repo):
    replace_file(bad, SEARCHED, edited(repo, SEARCHED, "vision.neuron", wider))
    mentions(call_stage("tune", tune__rearrange=False), SEARCHED, "vision.neuron has shape")


@pytest.mark.parametrize("cut", ["truncated", "garbage", "empty"])
def test_tune_search_mask_file_corrupt(call_stage, bad, repo, cut):
    whole = (repo / SEARCHED).read_bytes()
    data = {"truncated": whole[:-10], "garbage": b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}!!", "empty": b""}[cut]
    replace_file(bad, SEARCHED, data)
    mentions(call_stage("tune"), SEARCHED, "not a readable safetensors mask file")


def test_tune_before_search(call_stage, bad):
    bad.move_away(SEARCHED)
    mentions(call_stage("tune"), SEARCHED, "mask file not found")


def test_tune_search_mask_not_binary(call_stage, bad, repo):
    replace_file(bad, SEARCHED, edited(repo, SEARCHED, "vision.head", lambda t: t * 0.5))
    mentions(call_stage("tune"), SEARCHED, "must be binary (0/1) for rearrangement")


@pytest.mark.parametrize("key, edit, expected", [
    ("vision.neuron", fewer_layers, "vision.neuron has shape [5, 768], expected [6, 768]"),
    ("vision.head", wider, "vision.head has shape [6, 7], expected [6, 6]"),
    ("vision.head", poisoned(float("nan"), (0, 0)), "vision.head contains non-finite values"),
])
def test_export_mask_variants(call_stage, bad, repo, key, edit, expected):
    replace_file(bad, TUNED, edited(repo, TUNED, key, edit))
    mentions(call_stage("export"), TUNED, expected)


def test_export_mask_with_unknown_key(call_stage, bad, repo):
    tensors, metadata = read_safetensors(repo / TUNED)
    tensors["audio.head"] = tensors.pop("vision.head")
    replace_file(bad, TUNED, safetensors_bytes(tensors, metadata))
    mentions(call_stage("export"), TUNED, "unknown mask key 'audio.head'")


def test_export_before_tune(call_stage, bad):
    bad.move_away(TUNED)
    mentions(call_stage("export"), TUNED, "mask file not found")


def test_the_copy_ran_the_pipeline_with_small_calibration(repo):
    # the control for every case above: the unedited inputs are valid and the stages succeeded on them
    calibration = json.loads((repo / "data/prepared/calibration.json").read_text())
    assert len(calibration["pairs"]) == 64
    masks, metadata = read_safetensors(repo / SEARCHED)
    assert set(masks) == {"vision.head", "vision.neuron"}
    assert json.loads(metadata["constraint"]) == 0.5


# ---------------------------------------------------------------- tune warnings (in-process)

def test_tune_warns_when_scores_hold_no_gradients(repo, tmp_path, monkeypatch, capsys):
    """Magnitude scores carry no mask gradients: rearrangement cannot run and the stage must say so."""
    tensors, metadata = read_safetensors(repo / SCORES)
    no_grads = {k: v for k, v in tensors.items() if not k.endswith(".grads")}
    scores = tmp_path / "scores.safetensors"
    scores.write_bytes(safetensors_bytes(no_grads, {**metadata, "criterion": json.dumps("magnitude")}))
    monkeypatch.chdir(repo)
    monkeypatch.syspath_prepend(str(repo / "stages"))
    spec = importlib.util.spec_from_file_location("_tune_warning", repo / "stages" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SCORES = scores
    for name in ("REARRANGED", "TUNED", "REPORT", "TIMING"):  # keep the shared copy's outs untouched
        setattr(module, name, tmp_path / Path(getattr(module, name)).name)
    params = load_params(repo / "params.yaml")
    params["tune"]["lsq"] = False
    module.main(params)
    err = capsys.readouterr().err
    mentions(err, "tune: warning:", str(scores), "no mask gradients", "vision.head", "'magnitude'", "not rearranged")
    searched, _ = read_safetensors(repo / SEARCHED)
    rearranged, _ = read_safetensors(tmp_path / "rearranged.safetensors")
    assert all(torch.equal(searched[k], rearranged[k]) for k in searched)
