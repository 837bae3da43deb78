"""tune.precision: least-squares tuning in float32 vs bfloat16 / float16 autocast, on the pipeline's own masks.

Reads params.yaml and the outputs of ``dvc repro tune`` in ``--data-root`` (the rearranged masks, the
calibration pairs), tunes the rearranged masks once per precision as the tune stage does, and prints per
precision: wall time, the peak memory of the process (CUDA: ``max_memory_allocated``; CPU: the resident-set
growth), whether the same units are kept, the largest scale difference to float32, and the zero-shot top-1 /
R@1 of the dense model under the tuned masks (as ``evaluate``'s ``steps.tuned`` measures it).

    .venv/bin/python bench/tune_precision.py                          # embedded default, CPU
    .venv/bin/python bench/tune_precision.py --device cuda --precisions float32 bfloat16 float16
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "stages"))  # _evaluation: the evaluation data the stages read from params

import torch  # noqa: E402

from _evaluation import eval_data_from_params  # noqa: E402
from clipprune.config import parse_params  # noqa: E402
from clipprune.evaluate.suite import evaluate_masked  # noqa: E402
from clipprune.models import load_model  # noqa: E402
from clipprune.models.masks import load_masks  # noqa: E402
from clipprune.params import load_params  # noqa: E402
from clipprune.scoring import calibration_loader  # noqa: E402
from clipprune.tuning import tune_masks  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(REPO), help="checkout where `dvc repro tune` has run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    os.chdir(args.data_root)
    os.environ.setdefault("CLIPPRUNE_FIXTURES", str(REPO / "data" / "fixtures"))  # as the stages set it
    p = parse_params(load_params("params.yaml"), need=("model", "data", "tune", "evaluate"))
    masks = load_masks("artifacts/masks/rearranged.safetensors")
    model = load_model(p.model, args.device)
    loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"),
                                "data/prepared/calibration.json", model.preprocess, p.tune.batch_size)
    print(f"tune.precision on {p.model} ({args.device}), {len(loader.dataset)} calibration pairs, "
          f"load average {os.getloadavg()[0]:.2f}")
    reference = None
    data = eval_data_from_params(p)
    for precision in args.precisions:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss_before = peak_rss_bytes()
        start = time.perf_counter()
        tuned, _ = tune_masks(model, masks, loader, damp=p.tune.damp, max_scale=p.tune.max_scale,
                              batch_size=p.tune.batch_size, precision=precision)
        wall = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                else peak_rss_bytes() - rss_before)
        metrics = evaluate_masked(model, tuned, data, batch_size=p.evaluate.batch_size, progress=False)
        line = (f"  {precision}: {wall:.1f} s, peak memory {peak / 2 ** 20:.0f} MiB"
                f"{'' if args.device.startswith('cuda') else ' (RSS growth: only the first run is meaningful)'}, "
                f"top-1 {100 * metrics['zeroshot']['acc1']:.2f}, T->I R@1 "
                f"{100 * metrics['retrieval']['image_retrieval_recall@1']:.2f}, I->T R@1 "
                f"{100 * metrics['retrieval']['text_retrieval_recall@1']:.2f}")
        if reference is None:
            reference = tuned
        else:
            same = all(torch.equal(tuned[k] == 0, reference[k] == 0) for k in reference)
            diff = max(float((tuned[k] - reference[k]).abs().max()) for k in reference)
            line += f"; same kept units as {args.precisions[0]}: {same}, largest scale difference {diff:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
