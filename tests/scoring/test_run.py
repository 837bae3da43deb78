"""Calibration loader, score_model, the scores file, and the score stage end to end on a tiny dataset."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from clipprune.data.calibration import write_calibration
from clipprune.errors import ClipPruneError, DataError, ParamError
from clipprune.models import load_model
from clipprune.scoring import ScoreResult, calibration_loader, load_scores, save_scores, score_model

from models import single_thread_fixture

from . import write_captions_dataset, write_fixture_model

single_thread = single_thread_fixture()
STAGE = Path(__file__).resolve().parents[2] / "stages" / "score.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A repo-like directory: data/raw/tiny/{images, captions}, a calibration file, a fixture model."""
    root = tmp_path_factory.mktemp("workspace")
    images, captions = write_captions_dataset(root / "data" / "raw" / "tiny" / "train", num_images=6)
    pairs = [{"image_id": i, "annotation_id": 100 * i + (i % 2)} for i in (3, 1, 6, 2, 5)]
    write_calibration(root / "data" / "prepared" / "calibration.json", pairs, {"seed": 0})
    write_fixture_model(root / "fixtures" / "tiny")
    return root


@pytest.fixture()
def fixture_env(workspace, monkeypatch):
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(workspace / "fixtures"))
    return workspace


def loader_for(workspace, model, batch_size):
    train = workspace / "data" / "raw" / "tiny" / "train"
    return calibration_loader(train / "images", train / "captions_train.json",
                              workspace / "data" / "prepared" / "calibration.json", model.preprocess, batch_size)


def test_calibration_loader_keeps_the_file_order(fixture_env):
    model = load_model("fixture:tiny")
    loader = loader_for(fixture_env, model, batch_size=2)
    batches = list(loader)
    assert [len(c) for _, c in batches] == [2, 2, 1]
    assert batches[0][0].shape == (2, 3, 32, 32)
    assert loader.dataset.pairs == [(3, 301), (1, 101), (6, 600), (2, 200), (5, 501)]


def test_score_model_save_and_load_round_trip(fixture_env, tmp_path):
    model = load_model("fixture:tiny")
    loader = loader_for(fixture_env, model, batch_size=2)
    result = score_model(model, loader, criterion="fisher", loss="contrastive", granularity="batch",
                         towers="both", seed=3, progress=False)
    assert result.grads["vision.head.grads"].shape[0] == 3 and result.meta["seed"] == 3
    path = tmp_path / "scores" / "scores.safetensors"
    save_scores(path, result, {"model": "fixture:tiny"})
    assert sorted(os.listdir(path.parent)) == ["scores.safetensors"]
    loaded = load_scores(path)
    assert isinstance(loaded, ScoreResult)
    assert sorted(loaded.scores) == sorted(result.scores) and sorted(loaded.grads) == sorted(result.grads)
    for key, value in result.tensors().items():
        assert torch.equal(loaded.tensors()[key], value), key
    assert loaded.meta["model"] == "fixture:tiny" and loaded.meta["num_samples"] == 5
    assert loaded.meta["towers"] == ["vision", "text"] and loaded.meta["granularity"] == "batch"


def test_score_model_checks_batches_before_work(fixture_env):
    model = load_model("fixture:tiny")
    loader = loader_for(fixture_env, model, batch_size=2)  # 5 pairs: the last batch holds one sample
    with pytest.raises(ParamError, match=r"score\.batch_size=2 leaves a batch of 1 .* needs at least 2"):
        score_model(model, loader, criterion="fisher", loss="entropy", towers="vision", progress=False)
    magnitude = score_model(model, None, criterion="magnitude", towers="vision")
    assert magnitude.grads == {} and magnitude.meta["num_samples"] == 0


def test_load_scores_errors(tmp_path):
    with pytest.raises(ClipPruneError, match="scores file not found"):
        load_scores(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ClipPruneError, match="bad.safetensors: not a readable"):
        load_scores(bad)


def stage_module(monkeypatch):
    monkeypatch.syspath_prepend(str(STAGE.parent))  # the stage imports its sibling _common
    spec = importlib.util.spec_from_file_location("score_stage", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_params(**score):
    return {
        "seed": 0, "model": "fixture:tiny",
        "data": {"name": "tiny", "archives": [{"source": "tiny.zip", "sha256": None}],
                 "layout": {"train_images": "train/images", "train_captions": "train/captions_train.json",
                            "val_images": "train/images", "val_captions": "train/captions_train.json"}},
        "score": {"criterion": "fisher", "loss": "contrastive", "granularity": "sample", "towers": "both",
                  "batch_size": 2, **score},
    }


def test_stage_writes_deterministic_scores(fixture_env, monkeypatch):
    stage = stage_module(monkeypatch)
    monkeypatch.chdir(fixture_env)
    out = fixture_env / "artifacts" / "scores" / "scores.safetensors"
    stage.main(stage_params())
    first = load_scores(out)
    assert first.grads["text.neuron.grads"].shape[0] == 5  # one row per sample
    assert first.meta["model"] == "fixture:tiny" and first.meta["batch_size"] == 2
    assert first.meta["criterion"] == "fisher"
    assert "wall_time_s" not in first.meta  # timings live in reports/timing/, the artifact is byte-stable
    timing = json.loads((fixture_env / "reports" / "timing" / "score.json").read_text())
    assert timing["wall_time_s"] > 0 and timing["samples"] == 5
    stage.main(stage_params())
    second = load_scores(out)
    for key, value in first.tensors().items():
        assert torch.equal(second.tensors()[key], value), key
    stage.main(stage_params(criterion="magnitude"))
    assert load_scores(out).grads == {}


def test_stage_rejects_bad_params_without_output(fixture_env, monkeypatch, tmp_path):
    stage = stage_module(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no calibration file here
    with pytest.raises(ParamError, match=r"^score\.criterion must be one of"):
        stage.main(stage_params(criterion="taylor"))
    with pytest.raises(ParamError, match=r"^score\.granularity must be one of batch, sample"):
        stage.main(stage_params(granularity="token"))
    with pytest.raises(DataError):
        stage.main(stage_params())
    assert not (tmp_path / "artifacts").exists()
