"""Weight-sparsity methods on the embedded default: zero-shot top-1, R@1 and wall time per run.

    .venv/bin/python bench/sparsity_methods.py cap:1 cap:2 cap:4 --targets 0.9
    .venv/bin/python bench/sparsity_methods.py magnitude wanda sparsegpt fastcap cap --targets 0.5 0.75 0.9
    .venv/bin/python bench/sparsity_methods.py wanda sparsegpt --mask-type 2:4
    .venv/bin/python bench/sparsity_methods.py magnitude:g1 cap:g3 --targets 0.9 --gradual num_samples=null
    .venv/bin/python bench/sparsity_methods.py magnitude --targets 0.5 --model pruned:artifacts/models/pruned
    .venv/bin/python bench/sparsity_methods.py --table rows/*.json                     # the README grid

Each ``METHOD[:K]`` runs ``sparsify`` once for all ``--targets`` with ``sparsity.num_recomputations: K``
(default 1), the rest of ``sparsity:`` as params.yaml has it; ``METHOD:gN`` runs the sparse_gradual stage's
``run_gradual`` to each target instead (N pruning steps, N = 1: one-shot + fine-tune; the other ``gradual:`` and
``distill:`` keys as params.yaml has them, ``initial`` capped at the target; wall time includes the fine-tuning), on the calibration pairs of
data/prepared/calibration.json (stage ``calibrate``); each sparse model is evaluated on the val split as
``sparsify@<target>`` evaluates it. ``--data-root`` is the checkout whose data/ holds the embedded default
(``dvc repro calibrate evaluate_dense`` there first). Prints one Markdown row per run and target (method, k, mask, target, sparsity reached, top-1, T→I
R@1, I→T R@1 in %, wall and CPU time of ``sparsify``); ``--json``
also writes them; ``--model`` replaces ``model`` (e.g. a ``pruned:`` export: sparsity stacked on structural
pruning). ``--table FILE...`` prints the methods × sparsity grid of the README from such JSON files (a cell:
top-1 / T→I R@1 / I→T R@1 in %, wall time; "–": not recorded; the last file wins for a repeated cell; empty cells
were not run).
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
sys.path.insert(0, str(REPO / "stages"))  # _evaluation: the evaluation data the stages read from params

import torch  # noqa: E402
import yaml  # noqa: E402

from clipprune.config import parse_params  # noqa: E402
from _evaluation import eval_data_from_params  # noqa: E402
from clipprune.evaluate.suite import accuracy_metrics  # noqa: E402
from clipprune.models import load_model  # noqa: E402
from clipprune.params import load_params  # noqa: E402
from clipprune.scoring import calibration_loader  # noqa: E402
from clipprune.distill import TrainImages, distill_config  # noqa: E402
from clipprune.sparsity import apply_weights, get_method, sparsify, sparsity_config, sparsity_stats  # noqa: E402
from clipprune.sparsity.gradual import gradual_config, run_gradual  # noqa: E402
from clipprune.sparsity.layers import prunable_linears  # noqa: E402

COLUMNS = ("0.5", "0.75", "0.9", "0.95", "2:4")


def run_label(row: dict) -> str:
    if row.get("gradual_steps"):
        overrides = ", ".join(row.get("gradual_overrides") or [])
        return (f"{row['method']} gradual ({row['gradual_steps']} step{'s' if row['gradual_steps'] > 1 else ''} + "
                f"fine-tune{'; ' + overrides if overrides else ''})")
    k = row.get("num_recomputations", 1)
    return row["method"] + (f" (recomputation k={k})" if k > 1 else "") + (f" on {row['model']}" if row.get("model") else "")


def table(paths: list[str]) -> str:
    cells: dict[str, dict[str, str]] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            column = row["mask_type"] if row["mask_type"] != "unstructured" else repr(float(row["target"]))
            figures = " / ".join("–" if row.get(key) is None else f"{100 * row[key]:.1f}"
                                 for key in ("top1", "t2i_r1", "i2t_r1"))
            wall = row.get("wall_time_s")
            cells.setdefault(run_label(row), {})[column] = figures + ("" if wall is None else f" ({wall:.0f} s)")
    lines = ["| method | " + " | ".join(c if c == "2:4" else f"{float(c) * 100:g} %" for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, row in cells.items():
        lines.append(f"| {label} | " + " | ".join(row.get(c, "") for c in COLUMNS) + " |")
    return "\n".join(lines)


def gradual_run(raw: dict, p, config, model, loader, method: str, steps: int, targets) -> tuple[dict, float, float]:
    """``{target: model}`` pruned and fine-tuned by ``run_gradual`` (every tower parameter trains, not only the
    pruned weights), and the wall / CPU time of all of them."""
    out, wall, cpu = {}, 0.0, 0.0
    for target in targets:
        section = {**raw["gradual"], "method": method, "mask_type": config.mask_type, "final": target,
                   "initial": min(raw["gradual"].get("initial", 0.5), target), "steps": steps}
        q = parse_params({**raw, "gradual": section}, need=("seed", "distill", "gradual"))
        gradual = gradual_config(q.gradual)
        work, teacher = model.copy(), model.copy()
        data = TrainImages(p.data.path("train_images"), p.data.path("train_captions"), model.preprocess,
                           gradual.num_samples, p.seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        run_gradual(work, teacher, config, gradual, distill_config(q.distill, q.seed), loader, data,
                    seed=p.seed, progress=False)
        wall, cpu = wall + time.perf_counter() - start, cpu + time.process_time() - cpu_start
        out[target] = work
    return out, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="METHOD, METHOD:K (K = num_recomputations) or METHOD:gN (gradual, "
                                                "N pruning steps)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.9])
    parser.add_argument("--mask-type", default="unstructured")
    parser.add_argument("--data-root", default=str(REPO))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--model", help="replaces params.yaml's model (e.g. pruned:artifacts/models/pruned)")
    parser.add_argument("--gradual", action="append", default=[], metavar="KEY=VALUE",
                        help="override a gradual: key for METHOD:gN runs (YAML value), e.g. num_samples=null")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the grid of these --json files and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    raw = load_params(REPO / "params.yaml")
    if args.model:
        raw["model"] = args.model
    for item in args.gradual:
        key, _, value = item.partition("=")
        raw["gradual"] = {**raw["gradual"], key: yaml.safe_load(value)}
    if args.json:  # a relative path names a file of the calling directory, not of --data-root
        args.json = os.path.abspath(args.json)
    os.chdir(args.data_root)
    os.environ.setdefault("CLIPPRUNE_FIXTURES", str(REPO / "data" / "fixtures"))  # as the stages set it
    rows = []
    for run in args.runs:
        method, _, steps = run.partition(":")
        gradual_steps = int(steps[1:]) if steps.startswith("g") else 0
        section = {**raw["sparsity"], "method": method, "mask_type": args.mask_type, "targets": args.targets,
                   "num_recomputations": 1 if gradual_steps else int(steps or 1)}
        p = parse_params({**raw, "sparsity": section}, need=("seed", "model", "data", "sparsity", "evaluate"))
        config = sparsity_config(p.sparsity)
        torch.manual_seed(p.seed)
        model = load_model(p.model)
        loader = None
        if get_method(method).needs_data:
            loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"),
                                        "data/prepared/calibration.json", model.preprocess, config.batch_size)
        if gradual_steps:
            models, wall, cpu = gradual_run(raw, p, config, model, loader, method, gradual_steps, config.targets)
            weights_by_target = {t: {n: w.weight.detach() for n, w in prunable_linears(m, config.towers).items()}
                                 for t, m in models.items()}
            passes = None
        else:
            start, cpu_start = time.perf_counter(), time.process_time()
            result = sparsify(model, config, loader, seed=p.seed, progress=False)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start  # CPU time: less load-dependent
            weights_by_target, passes = result.weights, result.meta.get("calibration_passes")
            models = {}
        for target, weights in weights_by_target.items():
            sparse = models.get(target)
            if sparse is None:
                sparse = model.copy()
                apply_weights(sparse, weights, config.towers)
            metrics = accuracy_metrics(sparse, eval_data_from_params(p), batch_size=p.evaluate.batch_size,
                                       progress=False)
            row = {"method": method, "num_recomputations": config.num_recomputations, "mask_type": config.mask.name,
                   "target": target, "sparsity": sparsity_stats(weights)["overall"],
                   "top1": metrics["zeroshot"]["acc1"], "t2i_r1": metrics["retrieval"]["image_retrieval_recall@1"],
                   "i2t_r1": metrics["retrieval"]["text_retrieval_recall@1"], "wall_time_s": wall,
                   "cpu_time_s": cpu, "calibration_passes": passes, "gradual_steps": gradual_steps,
                   "model": args.model, "load_average_1min": os.getloadavg()[0],
                   "gradual_overrides": args.gradual}
            rows.append(row)
            print(f"| {method} | {row['num_recomputations']} | {row['mask_type']} | {target} | "
                  f"{row['sparsity']:.4f} | {100 * row['top1']:.1f} | {100 * row['t2i_r1']:.1f} | "
                  f"{100 * row['i2t_r1']:.1f} | {wall:.0f} s | {cpu:.0f} s |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
