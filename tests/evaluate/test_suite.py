"""The evaluate suite on the embedded default: cached dense evaluation, reuse of its text embeddings, labels."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from clipprune.evaluate import embeddings as embeddings_module
from clipprune.evaluate.suite import (EvalData, accuracy_metrics, compare_latency, evaluate_dense, evaluate_masked, evaluation_report,
                                      model_metrics, null_metric_notes)
from clipprune.models.pruned import export_pruned, load_pruned
from clipprune.models import full_masks, load_model, save_masks
from models import single_thread_fixture

_single_thread = single_thread_fixture()

REPO = Path(__file__).resolve().parents[2]
BATCH = 64
LATENCY = dict(latency_batch=2, latency_warmup=0, latency_repeats=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> EvalData:
    """The digits val split: zero-shot on its first 4 images of each of the 10 classes, retrieval on 24 images."""
    root = tmp_path_factory.mktemp("digits")
    with zipfile.ZipFile(REPO / "data/fixtures/digits.zip") as archive:
        archive.extractall(root)
    digits = root / "digits"
    folder = root / "classification"
    for class_dir in sorted((digits / "classification/val").iterdir()):
        (folder / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:4]:
            shutil.copy(image, folder / class_dir.name / image.name)
    return EvalData(digits / "images/val", digits / "annotations/captions_val.json", folder,
                    digits / "classification/classnames.json", digits / "classification/templates.json",
                    max_retrieval_images=24)


@pytest.fixture(scope="module")
def dense():
    return load_model("fixture:tiny_clip")


@pytest.fixture(scope="module")
def baseline(dense, data):
    return evaluate_dense(dense, data, inputs={"model": "fixture:tiny_clip"}, batch_size=BATCH, progress=False)


@pytest.fixture(scope="module")
def pipeline(dense, tmp_path_factory):
    """Search masks (binary) and tuned masks (scales) over the vision tower, and the exported tuned model."""
    root = tmp_path_factory.mktemp("pipeline")
    gen = torch.Generator().manual_seed(0)
    search = full_masks(dense, ["vision"])
    search["vision.head"][:, :2] = 0.0
    search["vision.neuron"] *= (torch.rand(search["vision.neuron"].shape, generator=gen) < 0.6).float()
    tuned = {key: mask * (0.8 + 0.4 * torch.rand(mask.shape, generator=gen)) for key, mask in search.items()}
    meta = {"method": "mac", "constraint": 0.5, "summary": {"towers": {"vision": {}}}}
    files = {"search": root / "search.safetensors", "tuned": root / "tuned.safetensors"}
    save_masks(files["search"], search, meta)
    save_masks(files["tuned"], tuned, meta)
    exported = export_pruned(dense, tuned, root / "pruned")
    return {"masks": {"search": search, "tuned": tuned}, "files": files, "pruned": exported}


def test_dense_evaluation_holds_accuracy_complexity_file_size_and_text(baseline):
    metrics = baseline.metrics
    assert set(metrics) == {"zeroshot", "retrieval", "complexity"}  # no latency: it is wall-clock, not cached
    assert metrics["zeroshot"]["acc1"] > 0.8 and metrics["zeroshot"]["acc5"] is not None  # 10 classes
    assert metrics["complexity"]["params"] > 0 and metrics["complexity"]["vision_prunable_gmacs"] > 0
    assert baseline.file_mb > 1
    assert set(baseline.text.entries) == {"zeroshot", "retrieval"}
    classifier = baseline.text.entries["zeroshot"][1]
    assert classifier.shape[1] == 10 and torch.allclose(classifier.norm(dim=0), torch.ones(10))
    assert baseline.text.entries["retrieval"][1].shape[0] == 24 * 5  # 5 captions per image


def test_report_reuses_the_dense_text_and_equals_a_fresh_evaluation(dense, data, baseline, pipeline, monkeypatch):
    encoded = []
    original = embeddings_module.encode_tokens
    monkeypatch.setattr(embeddings_module, "encode_tokens", lambda *a, **k: encoded.append(1) or original(*a, **k))
    lines = []
    report = evaluation_report(dense, baseline, data, final_dir=pipeline["pruned"],
                               before_distill_dir=pipeline["pruned"], mask_files=pipeline["files"], steps=True,
                               batch_size=BATCH, progress=False, log=lines.append, **LATENCY)
    assert encoded == []  # no text was encoded: every model here has the dense text tower
    reuse = [line for line in lines if "reusing" in line]
    assert len(reuse) == 4 and all("text tower unchanged" in line for line in reuse)
    assert [line.split(":")[0] for line in reuse] == ["final model", "exported model", "search masks", "tuned masks"]
    assert "final model: text tower unchanged: its text latency is the dense one's (ratio 1), timed once" in lines
    monkeypatch.undo()

    fresh = model_metrics(load_pruned(pipeline["pruned"]), data, batch_size=BATCH, progress=False)  # encodes
    pruned = report["pruned"]
    for key in ("zeroshot", "retrieval", "complexity"):
        assert pruned[key] == fresh[key], key
    assert pruned["before_distill"] == {key: fresh[key] for key in ("zeroshot", "retrieval")}
    for step, masks in pipeline["masks"].items():
        assert report["steps"][step] == evaluate_masked(dense, masks, data, batch_size=BATCH, progress=False)
    assert report["dense"] == {**baseline.metrics, "latency_ms": report["dense"]["latency_ms"]}
    assert set(report["dense"]["latency_ms"]) == set(pruned["latency_ms"]) == {"image_batch", "text_batch"}
    assert set(pruned["latency_ratio"]) == {"image", "text"} and pruned["latency_ratio"]["image"] > 0
    assert pruned["latency_ratio"]["text"] == 1.0  # the same text tower: timed once
    assert pruned["latency_ms"]["text_batch"] == report["dense"]["latency_ms"]["text_batch"] > 0
    assert report["dense_file_mb"] == baseline.file_mb > pruned["file_mb"]
    expected = fresh["complexity"]["vision_prunable_gmacs"] / baseline.metrics["complexity"]["vision_prunable_gmacs"]
    assert pruned["kept_mac_fraction"] == pytest.approx(expected) and 0.2 < expected < 0.8
    assert report["pruning_time_s"] == {"total": 0}  # no timing files given


def test_steps_and_before_distill_are_optional(dense, data, baseline, pipeline):
    report = evaluation_report(dense, baseline, data, final_dir=pipeline["pruned"], mask_files=pipeline["files"],
                               steps=False, batch_size=BATCH, progress=False, log=lambda line: None, **LATENCY)
    assert "steps" not in report and "before_distill" not in report["pruned"]
    assert {"dense", "pruned", "dense_file_mb", "pruning_time_s", "latency_rounds"} == set(report)
    rounds = report["latency_rounds"]
    assert rounds["rounds"] == LATENCY["latency_repeats"] and rounds["load_average_1m"] >= 0
    low, high = rounds["ratio_range"]["image"]
    assert low <= report["pruned"]["latency_ratio"]["image"] <= high


def test_dense_only_report(dense, data, baseline):
    report = evaluation_report(dense, baseline, data, batch_size=BATCH, progress=False, **LATENCY)
    assert set(report) == {"dense"}
    assert report["dense"]["zeroshot"] == baseline.metrics["zeroshot"]
    assert report["dense"]["latency_ms"]["image_batch"] > 0


def test_text_masks_encode_again(dense, data, baseline):
    masks = full_masks(dense, ["text"])
    masks["text.neuron"][:, ::2] = 0.0
    lines = []
    masked = evaluate_masked(dense, masks, data, batch_size=BATCH, progress=False, reuse=baseline.text,
                             log=lines.append)
    assert lines == ["masked model: text tower has hooks on it: encoding its class prompts and captions"]
    assert masked == evaluate_masked(dense, masks, data, batch_size=BATCH, progress=False)


def test_progress_bars_name_the_model(dense, data, capsys):
    small = EvalData(data.retrieval_images, data.retrieval_captions, max_retrieval_images=4)
    accuracy_metrics(dense, small, batch_size=BATCH, label="tuned masks")
    err = capsys.readouterr().err
    assert "tuned masks retrieval images" in err and "tuned masks retrieval captions" in err


def test_null_metric_notes_name_each_undefined_top_k():
    metrics = {"dense": {"zeroshot": {"acc1": 0.9, "acc5": 1.0},
                         "datasets": {"cars3": {"zeroshot": {"acc1": 0.5, "acc5": None}, "num_images": 6}}}}
    assert null_metric_notes(metrics) == [
        "dense.datasets.cars3.zeroshot.acc5 is null: top-5 is undefined with fewer than 5 classes "
        "(CLIP_benchmark 1.6.2 reports NaN)"]


def test_latency_of_another_text_tower_is_measured_interleaved(dense):
    other = dense.copy()
    with torch.no_grad():
        other.towers["text"].mlp_out_module(0).weight.mul_(0.5)
    timed = compare_latency(other, dense, batch_size=2, warmup=0, repeats=3, seed=0, same_text_tower=False)
    assert timed["ratio"]["text"] != 1.0 or timed["pruned_ms"]["text_batch"] != timed["dense_ms"]["text_batch"]
    assert all(timed[key][kind] > 0 for key in ("pruned_ms", "dense_ms") for kind in ("image_batch", "text_batch"))
    once = compare_latency(other, dense, batch_size=2, warmup=0, repeats=3, seed=0, same_text_tower=True)
    assert once["ratio"]["text"] == 1.0 and once["pruned_ms"]["text_batch"] == once["dense_ms"]["text_batch"]
