"""reports/summary.json: each column from the file of the stage that computed it, null (with the reason)
when this run did not compute it; scripts/answer.py's table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipprune.errors import DataError
from clipprune.report.summary import COLUMNS, MAX_COLUMNS, Column, build_summary, largest_target_report

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import answer  # noqa: E402

METRICS = {
    "dense": {"zeroshot": {"acc1": 0.96}, "retrieval": {"image_retrieval_recall@1": 0.05,
                                                         "text_retrieval_recall@1": 0.06},
              "complexity": {"params": 6_000_000}},
    "dense_file_mb": 24.0,
    "pruned": {"zeroshot": {"acc1": 0.9, "acc5": None}, "kept_mac_fraction": 0.5, "params_ratio": 0.75,
               "complexity": {"params": 4_500_000}, "file_mb": 18.0,
               "retrieval": {"image_retrieval_recall@1": 0.04, "image_retrieval_recall@5": 0.2,
                             "text_retrieval_recall@1": 0.03, "text_retrieval_recall@5": 0.25},
               "latency_ratio": {"image": 0.55, "text": 1.0},
               "before_distill": {"zeroshot": {"acc1": 0.85}}},
    "pruning_time_s": {"score": 3.0, "search": 0.5, "tune": 2.5, "distill": 40.0, "total": 6.0},
    "summary": {"method": "fisher+mac", "constraint": 0.5, "towers": ["text", "vision"]},
}


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def files(tmp_path):
    return {"metrics": write(tmp_path / "metrics.json", METRICS),
            "distill_timing": write(tmp_path / "timing/distill.json", {"wall_time_s": 40.0, "nproc": 1}),
            "distill_log": write(tmp_path / "distill/metrics.json", {"plan": {"towers": ["vision"]}}),
            "sparsity": write(tmp_path / "sparsity/0.75.json", {"method": "cap", "target": 0.75,
                                                               "sparse": {"zeroshot": {"acc1": 0.8}},
                                                               "file_bytes": {"ratio": 0.7}})}


def test_columns_fit_a_screen_and_are_unique():
    names = [column.name for column in COLUMNS]
    assert len(names) == len(set(names)) and len(names) <= MAX_COLUMNS
    with pytest.raises(ValueError, match="at most"):
        build_summary({}, tuple(Column(f"c{i}", "metrics", "x") for i in range(MAX_COLUMNS + 1)))


def test_every_column_read_from_its_source(files):
    summary, sources = build_summary(files)
    assert set(summary) == {column.name for column in COLUMNS}
    expected = {"method": "fisher+mac", "constraint": 0.5, "pruned_towers": "text+vision", "mac_pct": 50.0,
                "params_m": 4.5, "params_pct": 75.0, "top1": 90.0, "top1_before_distill": 85.0,
                "dense_top1": 96.0, "r1_t2i": 4.0, "r5_t2i": 20.0, "r1_i2t": 3.0, "r5_i2t": 25.0,
                "latency_ratio_image": 0.55, "latency_ratio_text": 1.0, "file_mb": 18.0, "pruning_time_s": 6.0,
                "distill_time_s": 40.0, "distill_towers": "vision", "sparse_method": "cap", "sparse_target": 0.75,
                "sparse_top1": 80.0, "sparse_file_ratio": 0.7}
    for name, value in expected.items():
        assert summary[name] == (pytest.approx(value) if isinstance(value, float) else value), name
    assert summary["top5"] is None and sources["top5"]["null"] == "null in the file"  # fewer than 5 classes
    assert sources["top1"] == {"stage": "evaluate", "file": str(files["metrics"]), "key": "pruned.zeroshot.acc1",
                               "what": "final model's zero-shot top-1 (%)"}
    assert sources["distill_time_s"]["stage"] == "distill" and sources["sparse_top1"]["stage"] == "sparsify"


def test_not_computed_columns_are_null_not_earlier_values(files, tmp_path):
    # a dense-only run (no pruned block), distillation off, no sparsity report for the largest target
    dense_only = write(tmp_path / "dense_only.json", {k: v for k, v in METRICS.items() if k not in ("pruned",
                                                                                                    "summary")})
    disabled_timing = write(tmp_path / "off/distill.json", {"wall_time_s": 0.01, "enabled": False})
    disabled_log = write(tmp_path / "off/metrics.json", {"enabled": False})
    summary, sources = build_summary({"metrics": dense_only, "distill_timing": disabled_timing,
                                      "distill_log": disabled_log, "sparsity": tmp_path / "sparsity/0.9.json"})
    assert summary["dense_top1"] == pytest.approx(96.0) and summary["pruning_time_s"] == 6.0
    for name in ("method", "mac_pct", "top1", "latency_ratio_image", "latency_ratio_text", "file_mb"):
        assert summary[name] is None and sources[name]["null"].startswith("not computed: no "), name
    assert summary["distill_time_s"] is None and sources["distill_time_s"]["null"] == "not computed: enabled is false"
    assert summary["distill_towers"] is None
    for name in ("sparse_method", "sparse_top1"):
        assert summary[name] is None and sources[name]["null"] == "not computed: no such file"
    # no sparsity section at all: the columns are null, with no file named
    summary, sources = build_summary({**files, "sparsity": None})
    assert summary["sparse_method"] is None and sources["sparse_method"]["file"] is None


def test_damaged_source_is_a_data_error(files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        build_summary({**files, "metrics": bad})
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        build_summary({**files, "metrics": bad})


def test_largest_target_report(tmp_path):
    assert largest_target_report(tmp_path / "none") is None
    for name in ("0.5", "0.75", "0.6"):
        write(tmp_path / f"{name}.json", {})
    assert largest_target_report(tmp_path).name == "0.75.json"


def test_summary_is_the_only_metrics_file_in_dvc_yaml():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = [entry for stage in spec["stages"].values() for entry in stage.get("do", stage).get("metrics", [])]
    assert [next(iter(entry)) if isinstance(entry, dict) else entry for entry in declared] == ["reports/summary.json"]
    assert "metrics" not in spec
    assert list(spec["stages"])[-1] == "summary"


def test_answer_table_aligns_dense_and_final(files):
    summary, _ = build_summary(files)
    text = answer.format_answer(summary, METRICS)
    lines = text.splitlines()
    assert lines[0] == "fisher+mac at constraint 0.5" and lines[-1] == "full report: reports/summary.md"
    assert len({len(line) for line in lines[1:-1]}) == 1  # right-aligned: every row ends in the same column
    assert len(lines) == 12  # title, header, 9 figures, the report path
    assert "96.00" in lines[2] and "90.00" in lines[2]
    table = {line.split("  ")[1].strip(): line for line in lines[2:-1]}
    assert table["latency ratio image / text"].endswith("0.550 / 1.000")
    assert table["kept MACs (%)"].split()[-2:] == ["100.0", "50.0"]
    assert table["pruning wall time (s)"].endswith("6.0") and table["distillation wall time (s)"].endswith("40.0")


def test_answer_dense_only_shows_dashes(files, tmp_path):
    summary, _ = build_summary({**files, "metrics": write(tmp_path / "d.json", {"dense": METRICS["dense"]})})
    text = answer.format_answer(summary, {"dense": METRICS["dense"]})
    assert text.splitlines()[0] == "dense"
    top1 = next(line for line in text.splitlines() if "top-1" in line)
    assert top1.split()[-2:] == ["96.00", "–"]


def test_answer_script_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts/answer.py"), "--summary", str(tmp_path / "no.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "no.json not found" in proc.stderr
