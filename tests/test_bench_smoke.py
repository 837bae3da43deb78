"""Smoke tests of the bench scripts: bench/kwon_vitb32.py --quick prints the three ratio lines; the sparsity grid
table renders; the 2:4 GPU bench exits 0 without a GPU.

No assertion on the timings themselves (they depend on the machine and its load).
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kwon_vitb32.py"


def test_kwon_bench_quick_prints_three_ratios(tmp_path):
    out_json = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for label in ("(a)", "(b)", "(c)"):
        hits = [line for line in lines if line.startswith(f"RATIO {label}")]
        assert len(hits) == 1, f"missing RATIO {label} line in:\n{proc.stdout}"
        value = float(re.search(r":\s*([0-9.]+)", hits[0]).group(1))
        assert math.isfinite(value) and value > 0
    assert re.search(r"kept MAC fraction \(vision, prunable\): 0\.\d+", proc.stdout)
    assert sum(("PASS" in line or "MISS" in line) for line in lines) == 3

    figures = json.loads(out_json.read_text())
    assert set(figures["figures"]) == {"latency_ratio", "passes_ratio", "projected_minutes"}
    assert set(figures["component_seconds"]) == {"score", "search", "rearrange", "lsq"}
    assert 0 < figures["kept_mac_fraction"] <= 0.5  # the search never exceeds the constraint


def test_kwon_bench_rejects_too_few_samples():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--samples", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--samples" in proc.stderr


def test_sparsity_grid_table_and_the_gpu_bench_without_a_gpu(tmp_path):
    """bench/sparsity_methods.py --table renders the README grid from rows; semi_structured_24.py exits 0 with its
    reason when CUDA is hidden."""
    bench = SCRIPT.parent
    rows = [{"method": "cap", "num_recomputations": 1, "mask_type": "unstructured", "target": 0.9, "top1": 0.883,
             "t2i_r1": 0.048, "i2t_r1": 0.05, "wall_time_s": 82.0, "gradual_steps": 0, "model": None},
            {"method": "cap", "num_recomputations": 1, "mask_type": "2:4", "target": 0.5, "top1": 0.964,
             "t2i_r1": None, "i2t_r1": None, "wall_time_s": None, "gradual_steps": 1, "model": None,
             "gradual_overrides": ["num_samples=null"]}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    proc = subprocess.run([sys.executable, str(bench / "sparsity_methods.py"), "--table", str(tmp_path / "rows.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "| method | 50 % | 75 % | 90 % | 95 % | 2:4 |", "|---|---|---|---|---|---|",
        "| cap |  |  | 88.3 / 4.8 / 5.0 (82 s) |  |  |",
        "| cap gradual (1 step + fine-tune; num_samples=null) |  |  |  |  | 96.4 / – / – |"]
    gpu = subprocess.run([sys.executable, str(bench / "semi_structured_24.py")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert gpu.returncode == 0 and "file size, not speed" in gpu.stderr, gpu.stderr[-2000:]
