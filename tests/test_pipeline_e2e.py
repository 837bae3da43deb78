"""End-to-end: `dvc repro` of the embedded default in a throwaway copy of the repo (slow; runs in CI)."""
import csv
import io
import json

import pytest
import yaml

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
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    assert len(calibration["pairs"]) == params["calibrate"]["num_samples"]


def test_repro_prunes_to_the_budget_and_exports_a_smaller_model(reproduced):
    metrics = json.loads((reproduced / "reports/metrics.json").read_text())
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    pruned = metrics["pruned"]
    # the exported model's searched towers cost no more than the budget (plus float rounding)
    assert pruned["kept_mac_fraction"] <= params["search"]["constraint"] + 1e-6
    assert pruned["complexity"]["params"] < metrics["dense"]["complexity"]["params"]
    assert pruned["file_mb"] < metrics["dense_file_mb"]
    # tuning is measured against search-only masks on the same data
    assert set(metrics["steps"]) == {"search", "rearranged", "tuned"}
    before = pruned["before_distill"]
    assert before["zeroshot"]["acc1"] == pytest.approx(metrics["steps"]["tuned"]["zeroshot"]["acc1"], abs=0.01)
    # distillation (on by default) must not lose what the tuned masks kept
    assert pruned["zeroshot"]["acc1"] >= before["zeroshot"]["acc1"]
    assert metrics["summary"]["top1_before_distill"] == pytest.approx(100 * before["zeroshot"]["acc1"])


def test_second_repro_runs_nothing(reproduced):
    status = dvc(reproduced, "status")
    assert "changed" not in status.stdout and "modified" not in status.stdout, status.stdout
    again = dvc(reproduced, "repro")
    assert "Running stage" not in again.stdout, again.stdout


def test_experiment_with_changed_param_shows_in_exp_show(reproduced):
    dvc(reproduced, "exp", "run", "-n", "cal256", "-S", "calibrate.num_samples=256")
    table = list(csv.DictReader(io.StringIO(dvc(reproduced, "exp", "show", "--csv").stdout)))
    row = next(r for r in table if r.get("Experiment") == "cal256")
    assert row["calibrate.num_samples"] == "256"
    # the experiment carries its own metrics (metrics.json is git-tracked, not DVC-cached)
    for column in ("dense.zeroshot.acc1", "pruned.zeroshot.acc1", "pruned.kept_mac_fraction",
                   "pruned.latency_ratio.image", "pruning_time_s.total", "summary.top1", "summary.mac_pct"):
        assert 0 < float(row[column]) < 1e6, (column, row[column])
