"""Bad inputs for the pruning stages (score, search, tune, export): one error line, exit 1, no outputs.

Same contract and helpers as ``test_bad_inputs.py``: subprocess cases run ``stages/<stage>.py`` in ONE
throwaway copy of the repo in which download, calibrate, score, search, tune and export already ran (64
calibration pairs, so every out exists and a failed stage can be seen not to touch it). Each case edits only
what it needs (params keys, a planted or moved-away file) and is undone after. More values of the same kinds
call the stage ``main`` in-process (fast). The subprocess cases (each starts a Python with torch and
open_clip: seconds apiece) are marked slow; the in-process ones run in ``make test-fast``.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from clipprune.errors import OutputError
from clipprune.params import load_params
from clipprune.tuning import TuningWarning
from pipeline_utils import copy_repo
# the shared bad-input machinery; `bad` and `call_stage` are fixtures that use this module's `repo`
from test_bad_inputs import (BadCase, bad, call_stage, empty_hf_home, mentions, tree_state)  # noqa: F401

SCORES = "artifacts/scores/scores.safetensors"
SEARCHED = "artifacts/masks/search.safetensors"
REARRANGED = "artifacts/masks/rearranged.safetensors"
TUNED = "artifacts/masks/tuned.safetensors"
TUNE_REPORT = "artifacts/masks/tune_report.json"
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


def stage_module(root: Path, name: str):
    """``stages/<name>.py`` of the copy as a fresh module (its path constants can be redirected)."""
    spec = importlib.util.spec_from_file_location(f"_pruning_{name}", root / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(root: Path, names) -> None:
    """Run ``stages/<name>.py:main`` for each name, in order, in this process with ``root`` as working dir."""
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        # with 64 calibration pairs a sub-block or two may keep its binary mask (a TuningWarning): fine here
        warnings.simplefilter("ignore", TuningWarning)
        patch.chdir(root)
        patch.syspath_prepend(str(root / "stages"))
        for name in names:
            stage_module(root, name).main(load_params(root / "params.yaml"))


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
    ({"search__metric": "flops"}, "search.metric must be one of mac, params, latency; got 'flops'"),
    ({"search__metric": None}, "search.metric must be one of mac, params, latency; got None"),
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
    module = stage_module(repo, "tune")
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


# ---------------------------------------------------------------- artifacts read back: dtypes, headers, ranges

HUGE_HEADER = struct.pack("<Q", 2**62) + b"{}"  # a header length safetensors refuses (over its 100 MB cap)
LONG_HEADER = struct.pack("<Q", 1 << 20) + b'{"a": 1}'  # a header length beyond the end of the file


@pytest.mark.parametrize("data", [HUGE_HEADER, LONG_HEADER], ids=["huge", "beyond_the_file"])
@pytest.mark.parametrize("stage_name, rel, what", [
    ("search", SCORES, "not a readable safetensors scores file"),
    ("tune", SEARCHED, "not a readable safetensors mask file"),
    ("tune", SCORES, "not a readable safetensors scores file"),
    ("export", TUNED, "not a readable safetensors mask file"),
])
def test_every_safetensors_read_refuses_a_bad_header(call_stage, bad, stage_name, rel, what, data):
    replace_file(bad, rel, data)
    mentions(call_stage(stage_name), rel, what, "Error while deserializing header")


def retyped(dtype):
    return lambda tensor: tensor.to(dtype)


@pytest.mark.parametrize("stage_name, rel, key, dtype", [
    ("search", SCORES, "vision.head", torch.int64),       # integer scores would rank (and tie) differently
    ("search", SCORES, "vision.neuron", torch.float16),
    ("tune", SCORES, "vision.head.grads", torch.int32),
    ("tune", SEARCHED, "vision.neuron", torch.int64),
    ("tune", SEARCHED, "vision.head", torch.bool),
    ("export", TUNED, "vision.head", torch.float64),
    ("export", TUNED, "vision.neuron", torch.uint8),
])
def test_score_and_mask_files_of_another_dtype_are_refused(call_stage, bad, repo, stage_name, rel, key, dtype):
    replace_file(bad, rel, edited(repo, rel, key, retyped(dtype)))
    mentions(call_stage(stage_name), rel, f"tensor {key} has dtype {str(dtype).removeprefix('torch.')}, "
                                          f"expected float32")


@pytest.mark.parametrize("value, edits, shown", [
    (1e30, {}, "1e+30, outside [-10, 10]"),
    (-10.5, {}, "-10.5, outside [-10, 10]"),
    (11.0, {}, "11, outside [-10, 10]"),
    (0.75, {"tune__max_scale": 0.5}, "0.75, outside [-0.5, 0.5]"),
])
def test_export_refuses_tuned_scales_outside_max_scale(call_stage, bad, repo, value, edits, shown):
    def edit(tensor):  # below max_scale 1 the tuned head scales (~1.03) are out of range too: make them binary
        return poisoned(value, (2, 3))((tensor != 0).float() if edits else tensor)
    replace_file(bad, TUNED, edited(repo, TUNED, "vision.head", edit))
    mentions(call_stage("export", **edits), TUNED, "vision.head layer 2 unit 3 holds the scale", shown,
             "(tune.max_scale)")


def test_export_accepts_binary_masks_when_max_scale_is_below_one(repo, tmp_path, monkeypatch):
    """Kept units of a sub-block tune left binary are 1: allowed whatever tune.max_scale (the control)."""
    monkeypatch.chdir(repo)
    monkeypatch.syspath_prepend(str(repo / "stages"))
    masks, metadata = read_safetensors(repo / TUNED)
    module = stage_module(repo, "export")
    module.MASKS, module.OUT = tmp_path / "tuned.safetensors", tmp_path / "pruned"
    module.MASKS.write_bytes(safetensors_bytes({k: (v != 0).float() for k, v in masks.items()}, metadata))
    params = load_params(repo / "params.yaml")
    params["tune"]["max_scale"] = 0.5
    module.main(params)
    assert (tmp_path / "pruned" / "config.json").is_file()


@pytest.mark.slow
def test_export_tuned_scales_of_1e30_through_the_stage(bad, repo):
    replace_file(bad, TUNED, edited(repo, TUNED, "vision.neuron", poisoned(1e30, (0, 1))))
    mentions(bad.run("export"), TUNED, "vision.neuron layer 0 unit 1 holds the scale 1e+30")


# ---------------------------------------------------------------- outputs on I/O errors: all or none, one line

def full_disk_for(monkeypatch, *names: str, code: int = errno.ENOSPC) -> None:
    """Writes of the temporaries of the outputs ``names`` fail as on a full disk (in this process)."""
    real_bytes, real_text = Path.write_bytes, Path.write_text

    def check(path):
        if any(path.name.startswith(f".{name}.") for name in names):
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (check(self), real_bytes(self, data))[1])
    monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: (check(self), real_text(self, data, *a, **k))[1])


@pytest.mark.parametrize("names, code", [
    (("tuned.safetensors",), errno.ENOSPC),  # the last mask file: rearranged.safetensors must not appear alone
    (("tune_report.json",), errno.ENOSPC),
    (("tune.json",), errno.EDQUOT),          # even the timing metric: none of the four outputs changes
    (("rearranged.safetensors",), errno.EROFS),
])
def test_tune_on_a_full_disk_writes_none_of_its_outputs(call_stage, monkeypatch, names, code):
    full_disk_for(monkeypatch, *names, code=code)
    message = call_stage("tune", tune__lsq=False)  # call_stage: the tree, old outputs included, is unchanged
    directory = "reports/timing" if names == ("tune.json",) else "artifacts/masks"
    mentions(message, f"{directory}: cannot write {names[0]} there ({os.strerror(code)})", "read-only or the disk full")


def test_tune_with_a_failing_rename_puts_the_previous_outputs_back(call_stage, repo, monkeypatch):
    from clipprune import io as cio

    real, failed = os.replace, []

    def replace(src, dst):  # the new tuned.safetensors cannot be renamed into place, once (after rearranged.*)
        if Path(src).name.startswith(".tuned.safetensors.") and Path(dst).name == "tuned.safetensors" and not failed:
            failed.append(src)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    before = {rel: (repo / rel).read_bytes() for rel in (REARRANGED, TUNED, TUNE_REPORT)}
    monkeypatch.setattr(cio.os, "replace", replace)
    mentions(call_stage("tune", tune__lsq=False), "artifacts/masks: cannot write tuned.safetensors there")
    assert {rel: (repo / rel).read_bytes() for rel in before} == before


@pytest.mark.parametrize("stage_name, constant", [("tune", "TUNED"), ("search", "TRACE"), ("export", "OUT")])
def test_output_folder_blocked_by_a_file_is_one_line(repo, tmp_path, monkeypatch, stage_name, constant):
    """An output whose folder cannot exist (a file is in the way): one line naming the folder, nothing written."""
    monkeypatch.chdir(repo)
    monkeypatch.syspath_prepend(str(repo / "stages"))
    module = stage_module(repo, stage_name)
    (tmp_path / "blocker").write_text("a file, not a folder")
    setattr(module, constant, tmp_path / "blocker" / "out" / Path(getattr(module, constant)).name)
    params = load_params(repo / "params.yaml")
    params["tune"]["lsq"] = False
    before = tree_state(repo)
    with warnings.catch_warnings(), pytest.raises(OutputError) as info:
        warnings.simplefilter("ignore", TuningWarning)
        module.main(params)
    mentions(str(info.value), f"{tmp_path / 'blocker' / 'out'}: cannot write", "a file is in the way of a folder")
    assert "\n" not in str(info.value) and tree_state(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.slow
def test_tune_on_a_full_disk_through_the_stage(bad):
    """The stage process itself meets the full disk: exit 1, one line naming artifacts/masks, no output."""
    bad.set(tune__lsq=False)  # (lsq of 64 pairs may warn about a sub-block: a second stderr line)
    bad.plant("full_disk_tune.py", FULL_DISK_WRAPPER.format(names=("tuned.safetensors",), script="stages/tune.py"))
    mentions(bad.run("tune", argv=["full_disk_tune.py"]), "artifacts/masks: cannot write tuned.safetensors there "
                                                          "(No space left on device)")


FULL_DISK_WRAPPER = """import errno, os, runpy, sys
from pathlib import Path
real_bytes, real_text = Path.write_bytes, Path.write_text
def check(path):
    if any(path.name.startswith(f".{{name}}.") for name in {names!r}):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
Path.write_bytes = lambda self, data: (check(self), real_bytes(self, data))[1]
Path.write_text = lambda self, data, *a, **k: (check(self), real_text(self, data, *a, **k))[1]
sys.argv = [{script!r}]
sys.path[0] = os.path.abspath(os.path.dirname({script!r}))
runpy.run_path({script!r}, run_name="__main__")
"""


# ---------------------------------------------------------------- distill: validation before any output is touched

@pytest.mark.parametrize("images, batch", [(8, 16), (12, 64)])
def test_distill_batch_larger_than_the_images_keeps_the_previous_logs(call_stage, repo, images, batch):
    assert list((repo / "reports/distill").rglob("*.tsv")), "the copy holds the committed reports/distill/"
    # call_stage: nothing in the copy changed or was deleted, reports/distill/ included
    message = call_stage("distill", distill__enabled=True, distill__num_samples=images, distill__batch_size=batch)
    mentions(message, f"distill.batch_size must be <= the {images} training images, got {batch}")
