"""CAP memory: what the block Fisher factors take for ViT-B/32's vision tower, analytic and measured.

    .venv/bin/python bench/cap_memory.py            # analytic table + one real-size layer (fc1, 3072x768)
    .venv/bin/python bench/cap_memory.py --quick    # a 256x64 layer instead (smoke test)

Analytic: per Linear layer ceil(numel / B) blocks of B×B Cholesky factors (float32: 4 bytes), and the
peak the memory plan (``sparsity/memory.py``) estimates for one layer per pass and for all layers at once.
Measured: the factors of one layer with random weights and gradients are built (one update of a few
gradients), their tensor bytes and the process RSS growth are printed, with the time of the update and of
an OBS sweep over 64 blocks. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from clipprune.sparsity.config import parse_mask_type  # noqa: E402
from clipprune.sparsity.fisher import BlockFisher, fisher_memory_bytes, to_blocks, \
    valid_positions  # noqa: E402
from clipprune.sparsity.memory import chunk_peak  # noqa: E402
from clipprune.sparsity.obs import obs_sweep  # noqa: E402

GIB = 2 ** 30
SWEEP_BLOCKS = 64


def vit_layers(width: int = 768, mlp: int = 3072, blocks: int = 12) -> list[tuple[str, int]]:
    """(name, numel) of the pruned Linear weights of a ViT tower: q/k/v/out_proj, fc1, fc2 per block."""
    per_block = [("q_proj", width * width), ("k_proj", width * width), ("v_proj", width * width),
                 ("out_proj", width * width), ("fc1", width * mlp), ("fc2", mlp * width)]
    return [(f"{i}.{name}", numel) for i in range(blocks) for name, numel in per_block]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def analytic(block_sizes=(50, 192), batch: int = 32) -> None:
    layers = vit_layers()
    numel = sum(n for _, n in layers)
    largest = max(n for _, n in layers)
    print(f"ViT-B/32 vision tower: {len(layers)} Linear weights, {numel:,} weights (largest layer {largest:,})")
    print(f"{'B':>5} {'all layers (GiB)':>17} {'one layer max (GiB)':>20} {'chunk_layers=1 peak (GiB)':>26} "
          f"{'one pass peak (GiB)':>20}")
    numels = [n for _, n in layers]
    for b in block_sizes:
        total = sum(fisher_memory_bytes(n, b) for n in numels)
        one = fisher_memory_bytes(largest, b)
        print(f"{b:>5} {total / GIB:>17.2f} {one / GIB:>20.3f} {chunk_peak(numels, 1, b, 4, batch) / GIB:>26.2f} "
              f"{chunk_peak(numels, len(numels), b, 4, batch) / GIB:>20.2f}")
    print(f"per-sample gradients of one batch of {batch}, all layers at once: {batch * numel * 4 / GIB:.2f} GiB "
          f"(computed per layer on access instead: {batch * largest * 4 / GIB:.2f} GiB)")


def measure(out_features: int, in_features: int, block_sizes=(50, 192), grads: int = 2) -> None:
    torch.manual_seed(0)
    numel = out_features * in_features
    weight = torch.randn(numel) * 0.02
    rows = torch.randn(grads, numel) * 1e-3
    print(f"measured on one {out_features}x{in_features} layer ({numel:,} weights), float32, 1 thread:")
    for b in block_sizes:
        before = rss_bytes()
        start = time.perf_counter()
        fisher = BlockFisher(numel, b, 1e-7, grads)
        fisher.update(rows)
        built = time.perf_counter() - start
        grown = rss_bytes() - before
        expected = fisher_memory_bytes(numel, b)
        blocks = to_blocks(weight.double(), b)[:SWEEP_BLOCKS]
        start = time.perf_counter()
        obs_sweep(blocks, fisher.inverse(0, SWEEP_BLOCKS), valid_positions(numel, b)[:SWEEP_BLOCKS], parse_mask_type("unstructured"))
        sweep = time.perf_counter() - start
        per_block = sweep / SWEEP_BLOCKS * math.ceil(numel / b)
        print(f"  B={b:>3}: factor tensor {fisher.memory_bytes() / GIB:.3f} GiB (analytic {expected / GIB:.3f}), "
              f"RSS +{grown / GIB:.3f} GiB; {grads} gradients {built:.2f} s; OBS sweep {SWEEP_BLOCKS} blocks {sweep:.2f} s "
              f"(whole layer ~{per_block:.0f} s)")
        del fisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="measure a 256x64 layer (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    analytic()
    if args.quick:
        measure(256, 64)
    else:
        measure(3072, 768)


if __name__ == "__main__":
    main()
