#!/usr/bin/env python
"""Benchmark: deployment of a pruned open_clip ViT-B-32 (random weights) on CPU, ratios measured in one run.

Two parts (both by default):

* ``latency``: the latency lookup table (``deploy/latency_table.py``) measured here at ``--batch``, the
  latency-constrained search (``search.metric: latency``) at constraints 0.5 and 0.7, and the exported
  model's measured latency ratio pruned/dense (interleaved) next to the constraint: the goal is within ±5 %.
* ``mac``: the MAC search at 0.5, without and with ``search.align`` (``--align``, 8): MAC ratio, PyTorch
  latency ratio and ONNX Runtime latency ratio pruned/dense (interleaved); on a CUDA machine also PyTorch fp16
  on the GPU.

Scores are seeded random importances (the kept counts, not which units, set the latency). Every timing line
prints the load average: rerun on an idle machine for figures to quote.

    .venv/bin/python bench/deploy_vitb32.py                       # both parts, batch 16
    .venv/bin/python bench/deploy_vitb32.py --part latency --batch 32
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipprune import flops
from clipprune.deploy.latency_table import measure_table
from clipprune.deploy.onnx_export import export_tower, onnx_latency_ratio
from clipprune.evaluate.latency import latency_ratio
from clipprune.models.open_clip_adapter import wrap_open_clip
from clipprune.models.prune import prune_model
from clipprune.search import get_search
from clipprune.search.align import align_neurons
from clipprune.search.latency import latency_search, predicted_fraction, tower_latencies

SEED = 0


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def build_model(arch: str):
    import open_clip

    torch.manual_seed(SEED)
    module = open_clip.create_model(arch, pretrained=None, device="cpu").float().eval()
    return wrap_open_clip(module, f"open_clip:{arch}/random", open_clip.get_model_config(arch), arch).eval()


def random_scores(views) -> dict[str, torch.Tensor]:
    """Seeded random importances, a head's scaled by its MAC cost in neurons (~132 for ViT-B/32) so that the
    searches keep a mix of heads and neurons (unscaled, a head is worth one neuron and all heads go)."""
    gen = torch.Generator().manual_seed(SEED)
    head_cost, neuron_cost = flops.unit_costs(views[0], "mac")
    heads = torch.rand(len(views), views[0].num_heads, generator=gen, dtype=torch.float64) * head_cost / neuron_cost
    neurons = torch.rand(len(views), views[0].ffn_dim, generator=gen, dtype=torch.float64)
    return {"vision.head": heads.float(), "vision.neuron": neurons.float()}


def widths(masks) -> str:
    heads = (masks["vision.head"] != 0).sum(dim=1).tolist()
    neurons = (masks["vision.neuron"] != 0).sum(dim=1).tolist()
    return f"heads {heads} neurons {neurons}"


def image_ratio(pruned, dense, images, warmup, repeats) -> float:
    return latency_ratio(lambda: pruned.encode_image(images), lambda: dense.encode_image(images), warmup,
                         repeats)["ratio"]


def latency_part(model, scores, views, images, args) -> None:
    start = time.perf_counter()
    table = measure_table(model, ["vision"], args.batch, warmup=1, repeats=args.table_repeats,
                          points=args.points, seed=SEED)
    models = tower_latencies(table)
    fit = models["vision"]
    print(f"[latency] table on {table['device']} at batch {args.batch} in {time.perf_counter() - start:.0f} s "
          f"({load()}): dense tower {1000 * fit.dense_seconds:.1f} ms, overhead {1000 * fit.overhead:.1f} ms; "
          f"attention {fit.attention.as_dict()}, MLP {fit.mlp.as_dict()} (scaled to the tower)")
    raw = table["towers"]["vision"]
    print(f"[latency] measured ms: skeleton {1000 * raw['skeleton_seconds']:.1f}; attention by heads "
          f"{[round(1000 * t, 1) for t in raw['attention']['seconds']]}; MLP at {raw['mlp']['widths']}: "
          f"{[round(1000 * t, 1) for t in raw['mlp']['seconds']]}")
    for constraint in args.constraints:
        masks = latency_search(scores, {"vision": views}, constraint, models)
        pruned = prune_model(model, masks)
        ratio = image_ratio(pruned, model, images, args.warmup, args.repeats)
        error = ratio / constraint - 1
        print(f"[latency] constraint {constraint:.2f}: predicted {predicted_fraction(masks, models):.3f}, "
              f"measured ratio {ratio:.3f} ({100 * error:+.1f} % of the constraint: "
              f"{'within' if abs(error) <= 0.05 else 'OUTSIDE'} ±5 %), MAC ratio "
              f"{flops.kept_fraction({'vision': views}, masks):.3f} ({load()})")
        print(f"[latency]   {widths(masks)}")


def mac_part(model, scores, views, images, args) -> None:
    tower_views = {"vision": views}
    masks = get_search("mac")(scores, tower_views, args.mac, "mac")

    def cost(tower, layer, kind, count):
        head_cost, neuron_cost = flops.unit_costs(views[layer], "mac")
        return count * (head_cost if kind == "head" else neuron_cost)

    budget = math.floor(args.mac * flops.prunable_macs(tower_views))
    variants = {"unaligned": masks,
                f"align {args.align}": align_neurons(masks, scores, tower_views, args.align, cost, budget)}
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        dense_dir.mkdir()
        export_tower(model, "image", dense_dir / "image.onnx", args.opset)
        for name, variant in variants.items():
            pruned = prune_model(model, variant)
            mac_ratio = flops.kept_fraction(tower_views, variant)
            torch_ratio = image_ratio(pruned, model, images, args.warmup, args.repeats)
            pruned_dir = Path(tmp) / name.replace(" ", "_")
            pruned_dir.mkdir()
            export_tower(pruned, "image", pruned_dir / "image.onnx", args.opset)
            ort = onnx_latency_ratio(pruned_dir, dense_dir, {"image": images}, args.warmup, args.repeats)["image"]
            line = (f"[mac {args.mac}] {name}: MAC ratio {mac_ratio:.3f}, PyTorch CPU latency ratio {torch_ratio:.3f}, "
                    f"ONNX Runtime CPU latency ratio {ort['ratio']:.3f}")
            if torch.cuda.is_available():
                dense_gpu, pruned_gpu = (m.copy() for m in (model, pruned))
                for m in (dense_gpu, pruned_gpu):
                    m.module.to("cuda", torch.float16)
                gpu_images = images.to("cuda", torch.float16)
                gpu_ratio = image_ratio(pruned_gpu, dense_gpu, gpu_images, args.warmup, args.repeats)
                line += f", GPU fp16 ({torch.cuda.get_device_name()}) PyTorch ratio {gpu_ratio:.3f}"
            print(f"{line} ({load()})")
            print(f"[mac {args.mac}]   {widths(variant)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--part", choices=("latency", "mac", "both"), default="both")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--table-repeats", type=int, default=7)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--mac", type=float, default=0.5)
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.arch)
    views = model.towers["vision"].block_views()
    scores = random_scores(views)
    gen = torch.Generator().manual_seed(SEED)
    images = torch.randn(args.batch, 3, model.image_size, model.image_size, generator=gen)
    print(f"{args.arch} random weights, batch {args.batch}, torch threads {torch.get_num_threads()} ({load()})")
    with torch.inference_mode():
        if args.part in ("latency", "both"):
            latency_part(model, scores, views, images, args)
    if args.part in ("mac", "both"):
        mac_part(model, scores, views, images, args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
