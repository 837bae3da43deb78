"""End-to-end: `dvc repro` of the embedded default in a throwaway copy of the repo (slow; runs in CI)."""
import json

import pytest

from pipeline_utils import copy_repo, dvc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    dvc(repo, "repro")
    return repo


def test_repro_writes_metrics_with_high_dense_accuracy(reproduced):
    metrics = json.loads((reproduced / "reports/metrics.json").read_text())
    dense = metrics["dense"]
    assert dense["zeroshot"]["acc1"] >= 0.90  # the embedded default must leave room to measure damage
    assert 0 < dense["retrieval"]["image_retrieval_recall@1"] <= dense["retrieval"]["image_retrieval_recall@10"]
    assert dense["complexity"]["vision_prunable_gmacs"] > 0
    assert dense["latency_ms"]["image_batch"] > 0
    calibration = json.loads((reproduced / "data/prepared/calibration.json").read_text())
    assert len(calibration["pairs"]) == 128


def test_second_repro_runs_nothing(reproduced):
    status = dvc(reproduced, "status")
    assert "changed" not in status.stdout and "modified" not in status.stdout, status.stdout
    again = dvc(reproduced, "repro")
    assert "Running stage" not in again.stdout, again.stdout


def test_experiment_with_changed_param_shows_in_exp_show(reproduced):
    dvc(reproduced, "exp", "run", "-S", "calibrate.num_samples=256")
    shown = json.loads(dvc(reproduced, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "256" in text and "acc1" in text
