"""Report: kept units from masks, Pareto point, summary.md against the metrics, PNGs, and the stage itself."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipprune.errors import DataError
from clipprune.evaluate.suite import summary_metrics
from clipprune.models.masks import save_masks
from clipprune.report import (ReportPaths, heatmap_matrices, kept_units, kept_units_rows, load_metrics,
                              load_search_trace, neuron_bins,
                              pareto_point, plot_accuracy_vs_mac, summary_markdown, write_report)

REPO = Path(__file__).resolve().parents[2]
LAYERS, HEADS, FFN = 4, 3, 48
# an adaptive search's trace of two blocks (what the search stage writes to search_trace.json)
TRACE = {"method": "adaptive", "loss": "entropy", "loss_inc_thresh": 0.02, "layers": [
    {"tower": "vision", "layer": 1, "width": 48, "loss_before": 1.0, "accepted_width": 24, "loss_after": 1.01,
     "candidates": [{"width": 24, "loss": 1.01, "increase": 0.01, "accepted": True},
                    {"width": 12, "loss": 1.2, "increase": 0.19, "accepted": False}]},
    {"tower": "vision", "layer": 0, "width": 48, "loss_before": 1.01, "accepted_width": 48, "loss_after": 1.01,
     "candidates": [{"width": 24, "loss": 1.5, "increase": 0.49, "accepted": False}]}]}


def model_metrics(acc1, r1_t2i, r1_i2t, params, gmacs, latency):
    return {
        "zeroshot": {"acc1": acc1, "acc5": 1.0, "mean_per_class_recall": acc1 - 0.01},
        "retrieval": {"image_retrieval_recall@1": r1_t2i, "image_retrieval_recall@5": 0.3,
                      "image_retrieval_recall@10": 0.5, "text_retrieval_recall@1": r1_i2t,
                      "text_retrieval_recall@5": 0.31, "text_retrieval_recall@10": 0.52},
        "complexity": {"gmacs": gmacs, "prunable_gmacs": gmacs * 0.9, "params": params},
        "latency_ms": {"image_batch": latency, "text_batch": 3.0},
    }


@pytest.fixture
def metrics():
    m = {
        "dense": model_metrics(0.9667, 0.054, 0.064, 6_022_465, 0.188, 80.0),
        "pruned": {**model_metrics(0.9220, 0.058, 0.078, 4_620_648, 0.0968, 43.0), "kept_mac_fraction": 0.4999,
                   "params_ratio": 0.7672, "latency_ratio": {"image": 0.563, "text": 1.01}, "file_mb": 18.5},
        "dense_file_mb": 24.1,
        "steps": {"tuned": {"zeroshot": {"acc1": 0.922}, "retrieval": {"image_retrieval_recall@1": 0.058,
                                                                         "text_retrieval_recall@1": 0.078}},
                  "search": {"zeroshot": {"acc1": 0.866}, "retrieval": {"image_retrieval_recall@1": 0.046,
                                                                          "text_retrieval_recall@1": 0.042}}},
        "pruning_time_s": {"distill": 30.0, "score": 3.5, "search": 0.01, "tune": 4.0, "total": 7.51},
        "latency_rounds": {"ratio_range": {"image": [0.51, 0.64], "text": [0.95, 1.1]}, "rounds": 10,
                           "load_average_1m": 3.2},
    }
    m["summary"] = summary_metrics(m, "fisher+mac", 0.5)
    return m


@pytest.fixture
def masks():
    gen = torch.Generator().manual_seed(0)
    heads = (torch.rand(LAYERS, HEADS, generator=gen) > 0.3).float() * 1.2  # tuned scales, not just 0/1
    neurons = (torch.rand(LAYERS, FFN, generator=gen) > 0.5).float()
    heads[0] = 0  # a layer with its attention dropped entirely
    return {"vision.head": heads, "vision.neuron": neurons}


def test_summary_metrics_flat_block(metrics):
    s = metrics["summary"]
    assert s["method"] == "fisher+mac" and s["constraint"] == 0.5
    assert s["mac_pct"] == pytest.approx(49.99) and s["top1"] == pytest.approx(92.20)
    assert s["dense_top1"] == pytest.approx(96.67) and s["params_m"] == pytest.approx(4.620648)
    assert s["r1_t2i"] == pytest.approx(5.8) and s["r1_i2t"] == pytest.approx(7.8)
    assert s["latency_ratio_image"] == 0.563 and s["latency_ratio_text"] == 1.01 and s["pruning_time_s"] == 7.51
    assert all(not isinstance(v, (dict, list)) for v in s.values())  # flat: one dvc exp show column each


def test_summary_metrics_dense_only_leaves_out_missing_keys():
    dense = model_metrics(0.9, 0.05, 0.06, 1_000_000, 0.1, 10.0)
    del dense["zeroshot"]
    s = summary_metrics({"dense": dense}, "dense", None)
    assert s["mac_pct"] == 100.0 and s["latency_ratio_image"] == 1.0 and s["params_m"] == 1.0
    assert "top1" not in s and "constraint" not in s and "pruning_time_s" not in s


def test_kept_units_counts_nonzero_scales(masks):
    kept = kept_units(masks)["vision"]
    assert kept["kept_heads"] == (masks["vision.head"] != 0).sum(1).tolist()
    assert kept["kept_heads"][0] == 0
    assert kept["kept_neurons"] == (masks["vision.neuron"] != 0).sum(1).tolist()
    assert (kept["total_heads"], kept["total_neurons"]) == (HEADS, FFN)
    rows = kept_units_rows(kept_units(masks))
    assert [r["layer"] for r in rows] == list(range(LAYERS))
    assert rows[1]["kept_neurons_pct"] == pytest.approx(100 * kept["kept_neurons"][1] / FFN)


def test_neuron_bins_average_each_run_of_neurons():
    neurons = torch.zeros(2, 8, dtype=torch.bool)
    neurons[0, :4] = True
    neurons[1, 6] = True
    assert neuron_bins(neurons, 4).tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    assert neuron_bins(neurons, 100).shape == (2, 8)  # never more bins than neurons


def test_heatmap_matrices_shape(masks):
    mats = heatmap_matrices(kept_units(masks))["vision"]
    assert mats["heads"].shape == (LAYERS, HEADS)
    assert mats["neurons"].shape == (LAYERS, 24)
    assert mats["heads"][0].sum() == 0 and float(mats["neurons"].max()) <= 1.0


def test_pareto_point_is_the_final_model(metrics):
    point = pareto_point(metrics)
    assert point == {"method": "fisher+mac", "constraint": 0.5, "kept_mac_pct": pytest.approx(49.99),
                     "top1": pytest.approx(92.20), "r1_t2i": pytest.approx(5.8)}
    dense_only = pareto_point({"dense": metrics["dense"]})
    assert dense_only["kept_mac_pct"] == 100.0 and dense_only["top1"] == pytest.approx(96.67)


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """First column -> other cells of the table under ``## heading``."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_summary_markdown_matches_metrics(metrics, masks):
    md = summary_markdown(metrics, kept_units(masks))
    table = table_rows(md, "Dense vs pruned")
    assert table["zero-shot top-1 (%)"] == ["96.67", "92.20", f"{0.9220 / 0.9667:.3f}"]
    assert table["image→text R@1 (%)"][:2] == ["6.40", "7.80"]
    assert table["params (M)"][:2] == ["6.022", "4.621"]
    assert table["file size (MB, float32)"][:2] == ["24.10", "18.50"]
    label = "{} latency ratio (interleaved median; min–max over rounds)"
    assert table[label.format("image")] == ["1", "0.563 (0.510–0.640)", ""]
    assert table[label.format("text")][1] == "1.010 (0.950–1.100)"
    assert "10 rounds" in md and "load average when it began: 3.20 (the machine was busy" in md
    steps = table_rows(md, "Pruning steps")
    assert list(steps)[1:] == ["search", "tuned"]  # pipeline order, not metrics.json's alphabetical order
    assert steps["search"][0] == "86.60"
    layers = table_rows(md, "Kept units per layer")
    assert layers["vision"] == ["3", f"{int((masks['vision.head'][3] != 0).sum())} / {HEADS}",
                                f"{int((masks['vision.neuron'][3] != 0).sum())} / {FFN}"]  # last layer wins
    times = table_rows(md, "Wall time")
    assert times["score"] == ["3.50"] and times["**pruning total** (score + search + tune)"] == ["**7.51**"]
    assert times["**distillation total**"] == ["**30.00**"] and "distill" not in times
    assert "Method **fisher+mac**, constraint 0.5" in md


def test_write_report_files(tmp_path, metrics, masks):
    paths = ReportPaths(tmp_path / "reports")
    drawn = write_report(metrics, masks, TRACE, paths, dpi=40)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.all())
    assert json.loads(paths.pareto.read_text()) == [drawn["pareto"]]
    assert len(json.loads(paths.kept_units.read_text())) == LAYERS
    import matplotlib.image as mpimg

    image = mpimg.imread(paths.kept_units_png)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100
    # same inputs, same bytes (no timestamps / versions in the PNGs)
    again = ReportPaths(tmp_path / "again")
    write_report(metrics, masks, TRACE, again, dpi=40)
    assert paths.kept_units_png.read_bytes() == again.kept_units_png.read_bytes()
    assert paths.accuracy_png.read_bytes() == again.accuracy_png.read_bytes()
    assert paths.search_trace_png.read_bytes() == again.search_trace_png.read_bytes()
    assert [p["name"] for p in drawn["points"]] == ["dense", "searched masks", "tuned masks", "exported"]


def test_accuracy_plot_labels_exported_and_distilled(tmp_path, metrics):
    metrics["pruned"]["before_distill"] = {"zeroshot": {"acc1": 0.9}}
    points = plot_accuracy_vs_mac(metrics, tmp_path / "acc.png", dpi=30)
    assert [(p["name"], round(p["value"], 2)) for p in points][-2:] == [("exported", 90.0), ("distilled", 92.2)]


def test_load_search_trace_errors(tmp_path):
    with pytest.raises(DataError, match="search trace not found"):
        load_search_trace(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, match in (("{not json", "not valid JSON"), ('{"layers": []}', "expected an object with 'method'"),
                        ('{"method": "mac", "layers": 3}', "a 'layers' list")):
        bad.write_text(text)
        with pytest.raises(DataError, match=match):
            load_search_trace(bad)
    bad.write_text(json.dumps(TRACE))
    assert load_search_trace(bad) == TRACE


def test_load_metrics_errors(tmp_path):
    with pytest.raises(DataError, match="metrics file not found"):
        load_metrics(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_metrics(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="'dense' entry"):
        load_metrics(bad)


def make_stage_dir(root: Path, metrics: dict, masks: dict | None) -> Path:
    (root / "stages").mkdir(parents=True)
    for name in ("report.py", "_common.py"):
        shutil.copy2(REPO / "stages" / name, root / "stages" / name)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")  # the stage's paths are on its cmd there
    (root / "artifacts/masks").mkdir(parents=True)
    (root / "artifacts/masks/search_trace.json").write_text(json.dumps(TRACE))
    (root / "params.yaml").write_text(yaml.safe_dump({"report": {"dpi": 40}}))
    (root / "reports").mkdir()
    (root / "reports/metrics.json").write_text(json.dumps(metrics))
    if masks is not None:
        save_masks(root / "artifacts/masks/tuned.safetensors", masks)
    return root


def run_report_stage(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stages/report.py"], cwd=root, capture_output=True, text=True, timeout=120)


def test_report_stage_writes_every_out(tmp_path, metrics, masks):
    root = make_stage_dir(tmp_path / "repo", metrics, masks)
    proc = run_report_stage(root)
    assert proc.returncode == 0, proc.stderr
    outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]["outs"]
    declared = [next(iter(o)) if isinstance(o, dict) else o for o in outs]
    assert declared and all((root / rel).is_file() for rel in declared), declared
    md = (root / "reports/summary.md").read_text()
    assert re.search(r"\| zero-shot top-1 \(%\) \| 96\.67 \| 92\.20 \|", md)
    assert "fisher+mac at 50.0 % of the MACs" in proc.stdout


def test_report_stage_bad_metrics_is_one_line_error(tmp_path, masks):
    root = make_stage_dir(tmp_path / "repo", {"pruned": {}}, masks)
    proc = run_report_stage(root)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[0].startswith("report: error: reports/metrics.json: expected")
    assert not (root / "reports/summary.md").exists()


def test_null_top5_is_a_dash_everywhere(tmp_path, metrics, masks):
    """acc5 is null for sets with fewer than 5 classes (CLIP_benchmark: NaN): no crash, no 'nan' / 'None' cells."""
    for block in (metrics["dense"], metrics["pruned"]):
        block["zeroshot"]["acc5"] = None
    metrics["summary"] = summary_metrics(metrics, "fisher+mac", 0.5)
    md = summary_markdown(metrics, kept_units(masks))
    assert table_rows(md, "Dense vs pruned")["zero-shot top-5 (%)"] == ["–", "–", "–"]
    assert not re.search(r"\|\s*(nan|none|null)\s*\|", md, re.IGNORECASE)
    assert "Top-5 is undefined with fewer than 5 classes" in md
    root = make_stage_dir(tmp_path / "repo", metrics, masks)
    assert '"acc5": null' in (root / "reports/metrics.json").read_text()
    proc = run_report_stage(root)
    assert proc.returncode == 0, proc.stderr
    assert "| zero-shot top-5 (%) | – | – | – |" in (root / "reports/summary.md").read_text()


def test_report_without_step_evaluations(tmp_path, metrics, masks):
    """evaluate.steps false: metrics.json has no steps block; the report leaves the section and points out."""
    del metrics["steps"]
    md = summary_markdown(metrics, kept_units(masks))
    assert "Pruning steps" not in md and "Dense vs pruned" in md
    drawn = write_report(metrics, masks, TRACE, ReportPaths(tmp_path / "reports"), dpi=40)
    assert [p["name"] for p in drawn["points"]] == ["dense", "exported"]
