"""Smoke test of bench/kwon_vitb32.py: the --quick run exits 0 and prints the three ratio lines.

No assertion on the timings themselves (they depend on the machine and its load).
"""
import json
import math
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
