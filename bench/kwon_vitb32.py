#!/usr/bin/env python
"""Benchmark: Kwon et al.'s pruning pipeline on open_clip ViT-B-32 (random weights), on CPU.

Prints, measured in one run:

(a) latency ratio pruned / dense of ``encode_image`` (batch ``--batch-size``) at MAC constraint 0.5: the
    vision tower is scored (Fisher, contrastive loss), searched (``mac``), rearranged and tuned (LSQ),
    then physically pruned with ``prune_model``; measured interleaved with ``evaluate.latency.latency_ratio``.
(b) the wall time of score + search + rearrange + LSQ tuning over N calibration samples divided by
    N / batch × the time of one Fisher step (one forward + backward to the masks of a batch): how many
    passes over the calibration data the whole pruning costs.
(c) the projected wall time of the same pipeline for 2048 samples (each component's measured time scaled
    to 2048 samples; ``--measure-2048`` runs it for real instead of only projecting).

Weights are random (``open_clip.create_model(arch, pretrained=None)``; no download) and so are the
calibration images and captions: the timings do not depend on the content. Seeds are fixed.

    .venv/bin/python bench/kwon_vitb32.py                 # ViT-B-32, N=256, all cores
    .venv/bin/python bench/kwon_vitb32.py --quick         # tiny architecture, a few samples (smoke test)
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from clipprune import flops
from clipprune.evaluate.latency import latency_ratio
from clipprune.io import write_json
from clipprune.models.open_clip_adapter import wrap_open_clip
from clipprune.models.open_clip_adapter import OpenClipModel, build_open_clip_module
from clipprune.models.prune import prune_model
from clipprune.scoring import frozen_parameters, mask_gradients, score_model
from clipprune.search import get_search
from clipprune.tuning import rearrange_masks, tune_masks

CONSTRAINT = 0.5
PROJECTED_SAMPLES = 2048
GOALS = {"latency_ratio": 0.55, "passes_ratio": 3.0, "projected_minutes": 15.0}
SEED = 0

# --quick: a tiny open_clip CLIP (same classes, same code paths), small enough for a smoke test
QUICK_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

WORDS = ("a photo of the small large red blue green dog cat car tree house person street sky water man woman "
         "two three with on in near under standing sitting playing white black old young field table").split()


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------
def build_model(arch: str, quick: bool) -> tuple[OpenClipModel, torch.nn.Module]:
    """(adapted model, untouched copy of the original open_clip module) with random weights.

    The adapter is configured as ``models.loading.load_model`` configures an ``open_clip:`` model.
    """
    import open_clip

    torch.manual_seed(SEED)
    if quick:
        model_cfg = copy.deepcopy(QUICK_MODEL_CFG)
        module = build_open_clip_module(model_cfg)
        tokenizer_arch, name = None, "open_clip:quick-tiny/random"
    else:
        if arch not in open_clip.list_models():
            raise SystemExit(f"--arch: unknown open_clip architecture {arch!r} (see open_clip.list_models())")
        module = open_clip.create_model(arch, pretrained=None, device="cpu")
        model_cfg = open_clip.get_model_config(arch)
        tokenizer_arch, name = arch, f"open_clip:{arch}/random"
    module = module.float().eval()
    original = copy.deepcopy(module)  # the adapter converts attention in place; keep the stock module
    return wrap_open_clip(module, name, model_cfg, tokenizer_arch).eval(), original


def make_calibration(model: OpenClipModel, samples: int, batch_size: int, seed: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (random normalised-range images, tokenized random short captions)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    size = model.image_size
    images = torch.randn(samples, 3, size, size, generator=gen)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(samples)]
    tokens = model.tokenizer(captions)
    device = next(model.parameters()).device
    return [(images[s:s + batch_size].to(device), tokens[s:s + batch_size].to(device))
            for s in range(0, samples, batch_size)]


def synchronize() -> None:
    """Wait for queued GPU work so that a wall-clock timer measures it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# timings
# ---------------------------------------------------------------------------------------------
def fisher_step_times(model: OpenClipModel, batch, repeats: int, warmup: bool) -> list[float]:
    """Wall times of ``repeats`` Fisher steps: contrastive loss of a batch, backward to the vision masks."""
    images, tokens = batch
    times = []
    with frozen_parameters(model):
        if warmup:
            mask_gradients(model, images, tokens, "contrastive", ("vision",), per_sample=False)
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            mask_gradients(model, images, tokens, "contrastive", ("vision",), per_sample=False)
            synchronize()
            times.append(time.perf_counter() - start)
    return times


@dataclass
class PipelineRun:
    samples: int
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of score, search, rearrange, lsq
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU time of the process (all threads)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def run_pipeline(model: OpenClipModel, batches, batch_size: int, progress: bool) -> PipelineRun:
    """Score (fisher, contrastive, vision, batch rows) → mac search → rearrange → LSQ tuning, each timed."""
    run = PipelineRun(samples=sum(b[0].shape[0] for b in batches))

    def timed(name, fn, *args, **kwargs):
        synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        synchronize()
        run.seconds[name] = time.perf_counter() - wall
        run.cpu_seconds[name] = time.process_time() - cpu
        return result

    scores = timed("score", score_model, model, batches, criterion="fisher", loss="contrastive",
                   granularity="batch", towers="vision", seed=SEED, progress=progress)
    views = {"vision": model.towers["vision"].block_views()}
    searched = timed("search", get_search("mac"), scores.scores, views, CONSTRAINT, "mac")
    rearrange_report: list = []
    rearranged = timed("rearrange", rearrange_masks, searched, scores.grads, report=rearrange_report,
                       progress=progress)
    tuned, tune_report = timed("lsq", tune_masks, model, rearranged, batches, towers="vision",
                               batch_size=batch_size, progress=progress)

    run.masks = tuned
    run.info = {
        "kept_heads": int((tuned["vision.head"] != 0).sum()),
        "kept_neurons": int((tuned["vision.neuron"] != 0).sum()),
        "rearrange_swaps": sum(e["swaps"] for e in rearrange_report),
        "lsq_accepted": tune_report["accepted"],
        "lsq_rejected": tune_report["rejected"],
    }
    return run


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def verdict(value: float, goal: float) -> str:
    return "PASS" if value <= goal else "MISS"


def print_table(figures: dict, c_measured: bool) -> None:
    rows = [
        ("(a) latency ratio pruned/dense", figures["latency_ratio"], GOALS["latency_ratio"], "{:.3f}"),
        ("(b) pruning cost / data passes", figures["passes_ratio"], GOALS["passes_ratio"], "{:.2f}"),
        (f"(c) {'measured' if c_measured else 'projected'} minutes for {PROJECTED_SAMPLES}",
         figures["projected_minutes"], GOALS["projected_minutes"], "{:.1f}"),
    ]
    print()
    print(f"{'figure':<38} {'measured':>10} {'goal':>8}  result")
    for label, value, goal, fmt in rows:
        print(f"{label:<38} {fmt.format(value):>10} {'<= ' + fmt.format(goal):>8}  {verdict(value, goal)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="calibration samples N (default 256; quick 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default 32; quick 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default all cores)")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--quick", action="store_true", help="tiny architecture and few samples (smoke test)")
    parser.add_argument("--latency-repeats", type=int, default=None, help="timed rounds of (a) (default 10; quick 3)")
    parser.add_argument("--step-repeats", type=int, default=None,
                        help="timed Fisher steps for (b), half before and half after the pipeline (default 4; quick 2)")
    parser.add_argument("--measure-2048", action="store_true",
                        help=f"also run the pipeline on {PROJECTED_SAMPLES} samples and report the measured time")
    parser.add_argument("--progress", action="store_true", help="progress bars for each stage")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default; the goals are for the 2-core CPU) or cuda (real-size GPU check)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    args.samples = args.samples if args.samples is not None else (16 if args.quick else 256)
    args.batch_size = args.batch_size if args.batch_size is not None else (8 if args.quick else 32)
    args.latency_repeats = args.latency_repeats or (3 if args.quick else 10)
    args.step_repeats = args.step_repeats or (2 if args.quick else 4)
    for name in ("samples", "batch_size", "threads", "latency_repeats", "step_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device must be cpu or cuda (with a CUDA device present), got {args.device!r}")
    if args.samples < 2 * args.batch_size:
        parser.error(f"--samples ({args.samples}) must hold at least two batches of --batch-size ({args.batch_size})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    print(f"kwon_vitb32: arch={'quick-tiny' if args.quick else args.arch} N={args.samples} "
          f"batch={args.batch_size} threads={args.threads} device={args.device} torch={torch.__version__}")
    load_start = load_average()
    print(f"load average at start: {load_start}")

    model, original = build_model(args.arch, args.quick)
    model, original = model.to(args.device), original.to(args.device)
    batches = make_calibration(model, args.samples, args.batch_size, SEED)
    steps = args.samples / args.batch_size  # N / batch: the Fisher steps of one pass over the data

    # (b) denominator: one Fisher step (forward + backward to the masks of one batch), timed before and
    # after the pipeline so that a change of machine load during the run weighs on both sides alike
    step_times = fisher_step_times(model, batches[0], (args.step_repeats + 1) // 2, warmup=True)
    run = run_pipeline(model, batches, args.batch_size, args.progress)
    step_times += fisher_step_times(model, batches[0], args.step_repeats // 2, warmup=False)
    step = statistics.median(step_times)
    print(f"one Fisher step (fwd+bwd, batch {args.batch_size}): median {step:.3f} s of "
          f"{', '.join(f'{t:.2f}' for t in step_times)}")
    passes = run.total / (steps * step)
    for name, seconds in run.seconds.items():
        print(f"  {name:<10} {seconds:9.2f} s  ({seconds / (steps * step):.2f} data passes; "
              f"cpu {run.cpu_seconds[name]:.1f} s)")
    print(f"  {'total':<10} {run.total:9.2f} s  over {args.samples} samples; {run.info}")

    # (c) projection: every component scaled linearly in the number of samples
    scale = PROJECTED_SAMPLES / args.samples
    projected = {name: seconds * scale for name, seconds in run.seconds.items()}
    projected_minutes = sum(projected.values()) / 60
    # a companion less sensitive to other processes: CPU time of all threads of this process
    projected_cpu_minutes = sum(run.cpu_seconds.values()) * scale / 60

    # (a) the pruned model, physically smaller, vs the dense adapted model (and vs stock open_clip)
    views = {"vision": model.towers["vision"].block_views()}
    kept_mac = flops.kept_fraction(views, {k: v for k, v in run.masks.items() if k.startswith("vision.")})
    pruned = prune_model(model, run.masks).eval()
    images = batches[0][0]
    latency = latency_ratio(lambda: pruned.encode_image(images), lambda: model.encode_image(images),
                            warmup=2, repeats=args.latency_repeats)
    stock = latency_ratio(lambda: pruned.encode_image(images), lambda: original.encode_image(images),
                          warmup=2, repeats=args.latency_repeats)
    print(f"encode_image batch {args.batch_size}: pruned {latency['a_seconds']:.3f} s, "
          f"dense {latency['b_seconds']:.3f} s (stock open_clip {stock['b_seconds']:.3f} s)")

    measured_2048 = None
    if args.measure_2048:
        big = make_calibration(model, PROJECTED_SAMPLES, args.batch_size, SEED)
        measured_2048 = run_pipeline(model, big, args.batch_size, args.progress)
        print(f"measured {PROJECTED_SAMPLES} samples: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                  measured_2048.seconds.items())
              + f"; total {measured_2048.total / 60:.2f} min")

    load_end = load_average()
    print()
    print(f"kept MAC fraction (vision, prunable): {kept_mac:.4f} (constraint {CONSTRAINT})")
    print(f"RATIO (a) latency pruned/dense encode_image: {latency['ratio']:.3f} "
          f"(vs stock open_clip module: {stock['ratio']:.3f})")
    print(f"RATIO (b) pruning wall time / (N/{args.batch_size} x Fisher step): {passes:.2f} "
          f"(score+search+rearrange+lsq {run.total:.1f} s, N/{args.batch_size}={steps:g} x {step:.3f} s)")
    print(f"RATIO (c) projected minutes for {PROJECTED_SAMPLES} samples: {projected_minutes:.2f} "
          f"(projection: each component's time x {scale:g}, not measured)"
          + (f"; measured: {measured_2048.total / 60:.2f}" if measured_2048 else ""))
    print(f"  CPU time projected for {PROJECTED_SAMPLES} samples: {projected_cpu_minutes:.2f} CPU-minutes over "
          f"{args.threads} thread(s); idle-machine estimate {projected_cpu_minutes / args.threads:.2f} min "
          f"(CPU / threads: perfect scaling; threads spin-waiting on a loaded machine inflate it)")
    # the goal of (c) is judged on the measured time when --measure-2048 gave one
    minutes_2048 = measured_2048.total / 60 if measured_2048 else projected_minutes
    figures = {"latency_ratio": latency["ratio"], "passes_ratio": passes, "projected_minutes": minutes_2048}
    print_table(figures, c_measured=measured_2048 is not None)
    print(f"load average at end: {load_end} ({os.cpu_count()} cores)")

    if args.json:
        write_json(args.json, {
            "arch": "quick-tiny" if args.quick else args.arch, "samples": args.samples,
            "batch_size": args.batch_size, "threads": args.threads, "constraint": CONSTRAINT,
            "kept_mac_fraction": kept_mac, "latency": latency, "latency_vs_stock_open_clip": stock,
            "fisher_step_seconds": step, "fisher_step_samples": step_times,
            "component_seconds": run.seconds, "component_cpu_seconds": run.cpu_seconds,
            "pipeline_info": run.info, "projected_cpu_minutes_2048": projected_cpu_minutes,
            "projected_seconds_2048": projected, "projected_minutes_2048": projected_minutes,
            "measured_seconds_2048": measured_2048.seconds if measured_2048 else None,
            "figures": figures, "goals": GOALS,
            "verdicts": {k: verdict(v, GOALS[k]) for k, v in figures.items()},
            "load_average": {"start": load_start, "end": load_end}, "cpu_count": os.cpu_count(),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
