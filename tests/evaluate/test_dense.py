"""The cached dense evaluation directory: written atomically, read back exactly, refused when stale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipprune.data.evalsets import parse_eval_datasets
from clipprune.errors import DataError
from clipprune.evaluate.dense import (EMBEDDINGS_NAME, METRICS_NAME, DenseEvaluation, evaluation_inputs,
                                      load_dense_evaluation, save_dense_evaluation)
from clipprune.evaluate.embeddings import TextEmbeddings
from clipprune.evaluate.suite import EvalData

DATA = EvalData(Path("data/raw/digits/images/val"), Path("data/raw/digits/captions_val.json"),
                Path("data/raw/digits/classification/val"), Path("data/raw/digits/classnames.json"),
                Path("data/raw/digits/templates.json"), max_retrieval_images=None)
SPECS = parse_eval_datasets([{"name": "coco", "type": "coco_karpathy", "root": "data/eval/coco",
                              "annotation": "data/eval/coco/test.json", "max_images": 10}])


def inputs(**changes) -> dict:
    args = dict(model="fixture:tiny_clip", seed=0, batch_size=128, data=DATA, datasets=SPECS)
    args.update(changes)
    return evaluation_inputs(**args)


def evaluation() -> DenseEvaluation:
    text = TextEmbeddings("f" * 64, 128, {"retrieval": ({"kind": "captions", "tokens": "a" * 64},
                                                        torch.arange(12, dtype=torch.float32).view(3, 4))})
    metrics = {"zeroshot": {"acc1": 0.9666, "acc5": None, "mean_per_class_recall": 0.9667},
               "retrieval": {"image_retrieval_recall@1": 0.054}, "complexity": {"params": 6022465}}
    return DenseEvaluation(inputs(), metrics, 24.1, text)


def test_inputs_are_plain_json_with_every_setting():
    record = inputs()
    assert json.loads(json.dumps(record)) == record
    assert record["data"]["retrieval_images"] == "data/raw/digits/images/val"
    assert record["datasets"][0]["name"] == "coco" and record["datasets"][0]["max_images"] == 10


def test_round_trip(tmp_path):
    save_dense_evaluation(tmp_path / "dense", evaluation())
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == [METRICS_NAME, EMBEDDINGS_NAME]
    loaded = load_dense_evaluation(tmp_path / "dense", inputs())
    assert loaded.metrics == evaluation().metrics and loaded.metrics["zeroshot"]["acc5"] is None
    assert (loaded.inputs, loaded.file_mb) == (inputs(), 24.1)
    assert loaded.text.fingerprint == "f" * 64 and loaded.text.batch_size == 128
    meta, tensor = loaded.text.entries["retrieval"]
    assert meta == {"kind": "captions", "tokens": "a" * 64} and torch.equal(tensor, torch.arange(12.0).view(3, 4))
    first = {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()}
    save_dense_evaluation(tmp_path / "dense", evaluation())
    assert {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()} == first  # byte-stable


@pytest.mark.parametrize("changes, params", [
    ({"model": "open_clip:ViT-B-32/openai"}, r"\(model\)"),
    ({"seed": 1}, r"\(seed\)"),
    ({"batch_size": 64}, r"\(evaluate\.batch_size\)"),
    ({"data": EvalData(DATA.retrieval_images, DATA.retrieval_captions, max_retrieval_images=100)},
     r"\(data\.name, data\.layout, evaluate\.retrieval_split or evaluate\.max_retrieval_images\)"),
    ({"datasets": []}, r"\(evaluate\.datasets\)"),
    ({"batch_size": 64, "seed": 2}, r"\(evaluate\.batch_size; seed\)"),
])
def test_stale_dense_evaluation_names_the_params_that_differ(tmp_path, changes, params):
    save_dense_evaluation(tmp_path / "dense", evaluation())
    with pytest.raises(DataError, match=rf"dense/metrics\.json: the dense evaluation was made for other params "
                                        rf"{params}; rerun the evaluate_dense stage"):
        load_dense_evaluation(tmp_path / "dense", inputs(**changes))


def test_missing_or_malformed_directory(tmp_path):
    with pytest.raises(DataError, match="dense evaluation not found \\(run the evaluate_dense stage first"):
        load_dense_evaluation(tmp_path / "dense", inputs())
    save_dense_evaluation(tmp_path / "dense", evaluation())
    path = tmp_path / "dense" / METRICS_NAME
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "format_version": 0}))
    with pytest.raises(DataError, match="format_version must be 1"):
        load_dense_evaluation(tmp_path / "dense", inputs())
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_dense_evaluation(tmp_path / "dense", inputs())
    path.write_text(json.dumps(record))
    (tmp_path / "dense" / EMBEDDINGS_NAME).unlink()
    with pytest.raises(DataError, match="text embeddings file not found"):
        load_dense_evaluation(tmp_path / "dense", inputs())


def test_failed_write_leaves_the_previous_directory(tmp_path):
    save_dense_evaluation(tmp_path / "dense", evaluation())
    before = {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()}
    broken = evaluation()
    broken.text.entries["retrieval"] = (broken.text.entries["retrieval"][0], "not a tensor")
    with pytest.raises(TypeError):
        save_dense_evaluation(tmp_path / "dense", broken)
    assert {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no temporary left
