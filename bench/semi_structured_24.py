"""2:4 sparsity on NVIDIA sparse tensor cores: speed-up of the vision tower's Linear layers and of encode_image.

    python bench/semi_structured_24.py                       # ViT-B-32 and ViT-L-14, batch 1 and 64, fp16
    python bench/semi_structured_24.py --arch ViT-L-14 --batch 128 --dtype bfloat16

Weights are random (``open_clip.create_model(arch, pretrained=None)``; no download), pruned 2:4 by magnitude
(``sparsity.method: magnitude``, ``mask_type: "2:4"``), then converted with
``clipprune.sparsity.semi_structured.to_sparse_semi_structured``. For every distinct Linear shape of the vision
tower and for the whole ``encode_image``, the dense masked model and the converted one run interleaved (A, B,
A, B, ...; CUDA-synchronised medians), and the script prints the ratio dense / sparse (> 1: sparse is faster)
and the largest output difference. Needs CUDA with compute capability >= 8.0; without it, it prints why and
exits 0 (on CPU weight sparsity gives file size, not speed).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from clipprune.models.open_clip_adapter import wrap_open_clip
from clipprune.sparsity import parse_config, sparsify, apply_weights, available_methods
from clipprune.sparsity.layers import prunable_linears
from clipprune.sparsity.semi_structured import CPU_DECISION, DTYPES, semi_structured_support, to_semi_structured


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def interleaved(dense_fn, sparse_fn, repeats: int, warmup: int = 5) -> tuple[float, float]:
    for _ in range(warmup):
        dense_fn(), sparse_fn()
    dense, sparse = [], []
    for _ in range(repeats):
        dense += timed(dense_fn, 1)
        sparse += timed(sparse_fn, 1)
    return statistics.median(dense), statistics.median(sparse)


def build(arch: str):
    import open_clip

    torch.manual_seed(0)
    module = open_clip.create_model(arch, pretrained=None, device="cpu").float().eval()
    return wrap_open_clip(module, f"open_clip:{arch}/random", open_clip.get_model_config(arch), arch).eval()


@torch.no_grad()
def bench_arch(arch: str, batches: list[int], dtype: torch.dtype, repeats: int) -> None:
    model = build(arch)
    config = parse_config({"method": "magnitude", "mask_type": "2:4", "targets": [0.5]}, available_methods())
    apply_weights(model, sparsify(model, config, None, progress=False).weights[0.5], ["vision"])
    dense = model.copy()
    dense.module.to("cuda", dtype)
    weights = {name: layer.weight.detach().clone() for name, layer in prunable_linears(dense, ["vision"]).items()}
    summary = to_semi_structured(model, ["vision"], dtype)
    print(f"{arch}: {len(summary['converted'])} Linear layers converted, {len(summary['dense'])} left dense "
          f"{sorted(summary['dense'])[:3]}")
    sparse_layers = prunable_linears(model, ["vision"])
    tokens = model.towers["vision"].tokens
    for batch in batches:
        seen = set()
        for name, weight in weights.items():
            if tuple(weight.shape) in seen or name not in summary["converted"]:
                continue
            seen.add(tuple(weight.shape))
            x = torch.randn(batch * tokens, weight.shape[1], device="cuda", dtype=dtype)
            sparse_w = sparse_layers[name].weight
            d, s = interleaved(lambda: F.linear(x, weight), lambda: F.linear(x, sparse_w), repeats)
            diff = float((F.linear(x, weight) - F.linear(x, sparse_w)).abs().max())
            print(f"  linear {tuple(weight.shape)} x ({batch}*{tokens} tokens): dense {d * 1e3:.3f} ms, 2:4 "
                  f"{s * 1e3:.3f} ms, speed-up {d / s:.2f}x (max |diff| {diff:.2e})")
        images = torch.randn(batch, 3, model.image_size, model.image_size, device="cuda", dtype=dtype)
        d, s = interleaved(lambda: dense.encode_image(images), lambda: model.encode_image(images), repeats)
        diff = float((dense.encode_image(images).float() - model.encode_image(images).float()).abs().max())
        print(f"  encode_image batch {batch}: dense {d * 1e3:.2f} ms, 2:4 {s * 1e3:.2f} ms, speed-up {d / s:.2f}x "
              f"(max |diff| {diff:.2e})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="open_clip architecture (repeatable; default ViT-B-32 "
                                                        "and ViT-L-14)")
    parser.add_argument("--batch", type=int, action="append", help="images per batch (repeatable; default 1, 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    usable, why = semi_structured_support()
    if not usable:
        print(f"semi_structured_24: {CPU_DECISION} ({why}); nothing to measure", file=sys.stderr)
        return 0
    print(f"device: {torch.cuda.get_device_name()} ({torch.__version__}), {args.dtype}")
    for arch in args.arch or ["ViT-B-32", "ViT-L-14"]:
        bench_arch(arch, args.batch or [1, 64], DTYPES[args.dtype], args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
