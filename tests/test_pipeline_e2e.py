"""End-to-end: `dvc repro` of the embedded default in a throwaway copy of the repo (slow; runs in CI)."""
import csv
import io
import json
import re

import pytest
import yaml

from pipeline_utils import dvc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(default_pipeline):
    """The embedded default reproduced once for the session (tests/conftest.py; test_sweep.py shares it)."""
    return default_pipeline


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_writes_metrics_with_high_dense_accuracy(reproduced):
    metrics = json.loads((reproduced / "reports/metrics.json").read_text())
    dense = metrics["dense"]
    assert dense["zeroshot"]["acc1"] >= 0.90  # the embedded default must leave room to measure damage
    assert 0 < dense["retrieval"]["image_retrieval_recall@1"] <= dense["retrieval"]["image_retrieval_recall@10"]
    assert dense["complexity"]["vision_prunable_gmacs"] > 0
    assert dense["latency_ms"]["image_batch"] > 0
    assert 0 < dense["zeroshot"]["acc5"] <= 1  # 10 classes: top-5 is defined
    # the cached dense evaluation is what metrics.json shows (latency is measured next to the pruned model)
    cached = json.loads((reproduced / "artifacts/eval/dense/metrics.json").read_text())
    assert {key: value for key, value in dense.items() if key != "latency_ms"} == cached["metrics"]
    assert metrics["dense_file_mb"] == cached["file_mb"]
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
    # the final model as ONNX, checked in ONNX Runtime (stage onnx_export; evaluate copies its report)
    onnx = metrics["onnx"]
    assert onnx["image"]["allclose"] and onnx["text"]["allclose"] and onnx["zeroshot"]["top1_equal"]
    assert onnx["zeroshot"]["top1_torch"] == pytest.approx(pruned["zeroshot"]["acc1"], abs=0.003)
    assert {p.name for p in (reproduced / "artifacts/onnx").iterdir()} == {"image.onnx", "text.onnx"}
    # search.metric mac: no latency table measured
    assert [p.name for p in (reproduced / "artifacts/latency").iterdir()] == ["skipped.json"]


def test_evaluate_reuses_the_dense_text_embeddings(reproduced):
    log = (reproduced.parent / "repro.log").read_text()
    assert {"evaluate_dense", "evaluate"} <= stages_run(log)
    for model in ("final model", "exported model", "search masks", "rearranged masks", "tuned masks"):
        assert re.search(rf"evaluate: {model}: text tower unchanged \(fingerprint [0-9a-f]{{12}}\): reusing the "
                         rf"dense model's class and caption embeddings", log), model


def test_sparsify_reads_the_cached_dense_evaluation(reproduced):
    """Each sparsify@<target> takes the dense figures and text embeddings from evaluate_dense, not its own run."""
    log = (reproduced.parent / "repro.log").read_text()
    metrics = json.loads((reproduced / "reports/metrics.json").read_text())
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    for target in params["sparsity"]["targets"]:
        report = json.loads((reproduced / f"reports/sparsity/{float(target)!r}.json").read_text())
        assert report["dense_reference"] == {key: metrics["dense"][key] for key in ("zeroshot", "retrieval")}
        assert report["sparsity"]["overall"] == pytest.approx(target, abs=1e-3)
    reused = re.findall(r"sparsify: sparse model: text tower unchanged \(fingerprint [0-9a-f]{12}\): reusing", log)
    assert len(reused) == len(params["sparsity"]["targets"])
    assert "dense zero-shot" not in log.split("Running stage 'sparsify@")[-1]


def test_second_repro_runs_nothing(reproduced):
    status = dvc(reproduced, "status")
    assert "changed" not in status.stdout and "modified" not in status.stdout, status.stdout
    again = dvc(reproduced, "repro")
    assert "Running stage" not in again.stdout, again.stdout


def test_a_sweep_over_constraints_or_criteria_does_not_touch_the_dense_evaluation(reproduced):
    params_path = reproduced / "params.yaml"
    original = params_path.read_text()
    try:
        for section, key, value in (("search", "constraint", 0.4), ("score", "criterion", "magnitude"),
                                    ("search", "method", "uniform"), ("evaluate", "steps", False),
                                    ("evaluate", "latency", {"batch_size": 8, "warmup": 1, "repeats": 2})):
            params = yaml.safe_load(original)
            params[section][key] = value
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
            status = json.loads(dvc(reproduced, "status", "--json").stdout)
            dry = stages_run(dvc(reproduced, "repro", "--dry").stdout)
            assert "evaluate_dense" not in status and "evaluate_dense" not in dry, (key, status, dry)
            assert status and dry, key  # the control: the edit is seen
        # the control: what the dense evaluation depends on reruns it
        params = yaml.safe_load(original)
        params["evaluate"]["batch_size"] = 64
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert "evaluate_dense" in json.loads(dvc(reproduced, "status", "--json").stdout)
    finally:
        params_path.write_text(original)
    assert json.loads(dvc(reproduced, "status", "--json").stdout) == {}


def test_experiment_with_changed_param_shows_in_exp_show(reproduced):
    before = json.loads((reproduced / "reports/metrics.json").read_text())
    # distillation and the per-step evaluations off: the experiment reruns search → report in a minute, and
    # what is under test (the changed param and the metrics in `exp show`) is the same
    run = dvc(reproduced, "exp", "run", "-n", "c04", "-S", "search.constraint=0.4", "-S", "distill.enabled=false",
              "-S", "evaluate.steps=false")
    assert "search" in stages_run(run.stdout) and "evaluate_dense" not in stages_run(run.stdout), run.stdout
    table = list(csv.DictReader(io.StringIO(dvc(reproduced, "exp", "show", "--csv").stdout)))
    row = next(r for r in table if r.get("Experiment") == "c04")
    assert row["search.constraint"] == "0.4"
    assert float(row["summary.mac_pct"]) <= 40 + 1e-4 and float(row["summary.constraint"]) == 0.4
    # the workspace holds the experiment's results: its dense figures are the cached ones (latency aside)
    after = json.loads((reproduced / "reports/metrics.json").read_text())
    assert after["summary"]["constraint"] == 0.4
    assert ({k: v for k, v in after["dense"].items() if k != "latency_ms"}
            == {k: v for k, v in before["dense"].items() if k != "latency_ms"})
    # the experiment carries its own metrics (summary.json is git-tracked, not DVC-cached); it is the only
    # metrics file, so `exp show` has its columns and no others (metrics.json's keys are not columns)
    for column in ("summary.dense_top1", "summary.top1", "summary.mac_pct", "summary.latency_ratio_image",
                   "summary.latency_ratio_text", "summary.pruning_time_s", "summary.file_mb"):
        assert 0 < float(row[column]) < 1e6, (column, row[column])
    # distillation was off in this run: its columns are empty, not the baseline's values
    assert row["summary.distill_time_s"] in ("", "-") and row["summary.top1_before_distill"] in ("", "-")
    metric_columns = [c for c in row if c.startswith("summary.")]
    assert 15 <= len(metric_columns) <= 25 and "pruned.zeroshot.acc1" not in row, sorted(row)
