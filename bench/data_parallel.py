"""1 vs 2 processes (gloo, CPU) for the score, evaluate_dense and sparse_prune stages on the embedded default.

A throwaway copy of the work tree (tracked and untracked-but-not-ignored files) gets the download and
calibrate stages, then each round runs ``stages/score.py``, ``stages/evaluate_dense.py`` and
``stages/sparse_prune.py`` (``--sparsity-method``, ``num_grads`` = the calibration pairs, targets 0.5 and 0.75)
with ``score.nproc`` / ``evaluate.nproc`` / ``sparsity.nproc`` 1 and 2, the order alternating from round to round (interleaved, so a
change of the machine's load hits both). Printed: the median wall time of each stage run (start-up, model
loading and torchrun included), score's own timing (``reports/timing/score.json``, rank 0's criterion
time), the speed-up 1-process / 2-process, whether the scores and sparse weights files are byte-identical, and
the load average.

    .venv/bin/python bench/data_parallel.py                        # 256 calibration pairs, 2 rounds
    .venv/bin/python bench/data_parallel.py --samples 512 --rounds 3 --sparsity-method sparsegpt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("score", "evaluate_dense", "sparse_prune")


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


def run(root: Path, name: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, f"stages/{name}.py"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stages/{name}.py failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def set_params(root: Path, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="calibrate.num_samples (default 256)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sparsity-method", default="cap", help="sparsity.method of sparse_prune (default cap)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="clipprune-dp-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        set_params(root, calibrate={"num_samples": args.samples},
                   sparsity={"method": args.sparsity_method, "num_grads": args.samples, "targets": [0.5, 0.75]})
        for name in ("download", "calibrate"):
            run(root, name)
        times = {(stage, n): [] for stage in STAGES for n in (1, 2)}
        inner = {1: [], 2: []}
        scores, sparse = {}, {}
        for round_ in range(args.rounds):
            for nproc in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                set_params(root, score={"nproc": nproc}, evaluate={"nproc": nproc}, sparsity={"nproc": nproc})
                times["score", nproc].append(run(root, "score"))
                inner[nproc].append(json.loads((root / "reports/timing/score.json").read_text())["wall_time_s"])
                scores[nproc] = (root / "artifacts/scores/scores.safetensors").read_bytes()
                times["evaluate_dense", nproc].append(run(root, "evaluate_dense"))
                times["sparse_prune", nproc].append(run(root, "sparse_prune"))
                sparse[nproc] = (root / "artifacts/sparse/pruned.safetensors").read_bytes()
    load_after = os.getloadavg()
    print(f"score ({args.samples} calibration pairs), evaluate_dense and sparse_prune ({args.sparsity_method}) on the embedded default, {args.rounds} "
          f"interleaved round(s), {os.cpu_count()} CPUs; load average before {load_before[0]:.2f} "
          f"{load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
          f"{load_after[2]:.2f}")
    for stage in STAGES:
        one, two = (statistics.median(times[stage, n]) for n in (1, 2))
        print(f"  {stage}: 1 process {one:.1f} s, 2 processes {two:.1f} s (stage wall time, start-up included); "
              f"RATIO speed-up {one / two:.2f}")
    one, two = statistics.median(inner[1]), statistics.median(inner[2])
    print(f"  score criterion time (rank 0): 1 process {one:.1f} s, 2 processes {two:.1f} s; RATIO speed-up "
          f"{one / two:.2f}")
    print(f"  scores file byte-identical with 1 and 2 processes: {scores[1] == scores[2]}")
    print(f"  sparse weights byte-identical with 1 and 2 processes: {sparse[1] == sparse[2]} (the 2 workers run "
          f"one thread each, the single process {os.cpu_count()}: the floats may differ in the last bit)")


if __name__ == "__main__":
    main()
