"""The evaluate stage with ``evaluate.datasets`` set, in a throwaway copy of the repo (tiny CLIP, tiny sets)."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline_utils import copy_repo, stage

from .evalset_fixtures import write_coco_karpathy, write_flickr30k_karpathy, write_imagenet_val

pytestmark = pytest.mark.slow  # about 40 s on 2 shared cores: a repo copy, the download stage, evaluate_dense, evaluate

EXTRA = [
    {"name": "imagenet1k", "type": "imagefolder", "root": "data/eval/imagenet1k/val",
     "classnames": "data/eval/imagenet1k/en_classnames.json",
     "templates": "data/eval/imagenet1k/en_zeroshot_classification_templates.json"},
    {"name": "mscoco_karpathy_test", "type": "coco_karpathy", "root": "data/eval/mscoco_captions/val2014",
     "annotation": "data/eval/mscoco_captions/coco_test_karpathy.json"},
    {"name": "flickr30k_karpathy_test", "type": "flickr30k_karpathy", "root": "data/eval/flickr30k",
     "annotation": "data/eval/flickr30k/flickr30k_test_karpathy.txt", "max_images": 2},
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy with the digits data downloaded, small evaluate settings and the three tiny sets in data/eval/."""
    repo = copy_repo(tmp_path_factory.mktemp("evalsets_repo"))
    assert stage(repo, "download").returncode == 0
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["evaluate"]["datasets"] == []  # the default pipeline evaluates no extra set
    params["data"]["layout"]["classification"] = None  # the digits zero-shot split is most of the run time
    params["evaluate"].update(max_retrieval_images=10, batch_size=32,
                              latency={"batch_size": 2, "warmup": 0, "repeats": 1}, datasets=EXTRA)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_imagenet_val(repo / "data/eval/imagenet1k")
    write_coco_karpathy(repo / "data/eval/mscoco_captions")
    write_flickr30k_karpathy(repo / "data/eval/flickr30k")
    return repo


def test_metrics_per_dataset_next_to_the_existing_keys(repo):
    dense_proc = stage(repo, "evaluate_dense")
    assert dense_proc.returncode == 0, dense_proc.stderr[-2000:]
    # 3 classes: top-5 is undefined; CLIP_benchmark 1.6.2 reports NaN, JSON null here, and the log says why
    assert ("evaluate_dense: dense.datasets.imagenet1k.zeroshot.acc5 is null: top-5 is undefined with fewer "
            "than 5 classes (CLIP_benchmark 1.6.2 reports NaN)") in dense_proc.stdout
    proc = stage(repo, "evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    dense = metrics["dense"]
    assert set(dense) == {"retrieval", "complexity", "latency_ms", "datasets"}  # existing keys unchanged
    assert set(dense["datasets"]) == {"imagenet1k", "mscoco_karpathy_test", "flickr30k_karpathy_test"}
    imagenet = dense["datasets"]["imagenet1k"]
    assert imagenet["num_images"] == 6 and set(imagenet["zeroshot"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0 <= imagenet["zeroshot"]["acc1"] <= 1 and imagenet["zeroshot"]["acc5"] is None
    assert '"acc5": null' in (repo / "reports/metrics.json").read_text()  # valid JSON: null, never NaN
    coco = dense["datasets"]["mscoco_karpathy_test"]
    assert (coco["num_images"], coco["num_captions"]) == (3, 16)
    assert coco["retrieval"]["image_retrieval_recall@5"] == coco["retrieval"]["text_retrieval_recall@5"] == 1.0
    flickr = dense["datasets"]["flickr30k_karpathy_test"]
    assert (flickr["num_images"], flickr["num_captions"]) == (2, 3)  # max_images: 2
    assert "flickr30k_karpathy_test: R@1" in proc.stdout


@pytest.mark.parametrize("stage_name", ["evaluate_dense", "evaluate"])
def test_bad_extra_dataset_fails_before_evaluating(repo, stage_name):
    outputs = (repo / "reports/metrics.json", repo / "artifacts/eval/dense/metrics.json")
    before = [path.read_bytes() for path in outputs]
    params_text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["evaluate"]["datasets"][1]["annotation"] = "data/eval/mscoco_captions/coco_karpathy_test.json"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = stage(repo, stage_name, timeout=120)
    finally:
        (repo / "params.yaml").write_text(params_text)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"{stage_name}: error: data/eval/mscoco_captions/coco_karpathy_test.json: "
                                   "annotation file not found")
    assert [path.read_bytes() for path in outputs] == before
