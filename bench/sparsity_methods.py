"""Weight-sparsity methods on the embedded default: zero-shot top-1, R@1 and wall time per run.

    .venv/bin/python bench/sparsity_methods.py cap:1 cap:2 cap:4 --targets 0.9
    .venv/bin/python bench/sparsity_methods.py magnitude wanda sparsegpt fastcap cap --targets 0.5 0.75 0.9
    .venv/bin/python bench/sparsity_methods.py wanda sparsegpt --mask-type 2:4

Each ``METHOD[:K]`` runs ``sparsify`` once for all ``--targets`` with ``sparsity.num_recomputations: K``
(default 1), the rest of ``sparsity:`` as params.yaml has it, on the calibration pairs of
data/prepared/calibration.json (stage ``calibrate``); each sparse model is evaluated on the val split as
``sparsify@<target>`` evaluates it. ``--data-root`` is the checkout whose data/ holds the embedded default
(``dvc repro calibrate evaluate_dense`` there first). Prints one Markdown row per run and target (method, k, mask, target, sparsity reached, top-1, T→I
R@1, I→T R@1 in %, wall and CPU time of ``sparsify``); ``--json``
also writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from clipprune.config import parse_params  # noqa: E402
from clipprune.evaluate.suite import accuracy_metrics, eval_data_from_params  # noqa: E402
from clipprune.models import load_model  # noqa: E402
from clipprune.params import load_params  # noqa: E402
from clipprune.scoring import calibration_loader  # noqa: E402
from clipprune.sparsity import apply_weights, get_method, sparsify, sparsity_config, sparsity_stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="METHOD or METHOD:K (K = num_recomputations)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.9])
    parser.add_argument("--mask-type", default="unstructured")
    parser.add_argument("--data-root", default=str(REPO))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    raw = load_params(REPO / "params.yaml")
    os.chdir(args.data_root)
    os.environ.setdefault("CLIPPRUNE_FIXTURES", str(REPO / "data" / "fixtures"))  # as the stages set it
    rows = []
    for run in args.runs:
        method, _, steps = run.partition(":")
        section = {**raw["sparsity"], "method": method, "mask_type": args.mask_type, "targets": args.targets,
                   "num_recomputations": int(steps or 1)}
        p = parse_params({**raw, "sparsity": section}, need=("seed", "model", "data", "sparsity", "evaluate"))
        config = sparsity_config(p.sparsity)
        torch.manual_seed(p.seed)
        model = load_model(p.model)
        loader = None
        if get_method(method).needs_data:
            loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"),
                                        "data/prepared/calibration.json", model.preprocess, config.batch_size)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = sparsify(model, config, loader, seed=p.seed, progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start  # CPU time: less load-dependent
        for target, weights in result.weights.items():
            sparse = model.copy()
            apply_weights(sparse, weights, config.towers)
            metrics = accuracy_metrics(sparse, eval_data_from_params(p), batch_size=p.evaluate.batch_size,
                                       progress=False)
            row = {"method": method, "num_recomputations": config.num_recomputations, "mask_type": config.mask.name,
                   "target": target, "sparsity": sparsity_stats(weights)["overall"],
                   "top1": metrics["zeroshot"]["acc1"], "t2i_r1": metrics["retrieval"]["image_retrieval_recall@1"],
                   "i2t_r1": metrics["retrieval"]["text_retrieval_recall@1"], "wall_time_s": wall,
                   "cpu_time_s": cpu, "calibration_passes": result.meta.get("calibration_passes")}
            rows.append(row)
            print(f"| {method} | {row['num_recomputations']} | {row['mask_type']} | {target} | "
                  f"{row['sparsity']:.4f} | {100 * row['top1']:.1f} | {100 * row['t2i_r1']:.1f} | "
                  f"{100 * row['i2t_r1']:.1f} | {wall:.0f} s | {cpu:.0f} s |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
