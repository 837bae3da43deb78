"""Peak memory of Fisher scoring with and without ``score.checkpointing`` (ViT-L/14 by default).

Each mode runs in its own child process (a fresh allocator, so one mode's peak cannot hide the other's):
random weights (``open_clip.create_model(arch, pretrained=None)``, nothing is downloaded) wrapped as
``load_model`` wraps an ``open_clip:`` model, random images and captions, ``score_model(criterion="fisher",
loss="contrastive", towers="vision")`` for ``--batches`` batches. Reported: the peak resident set size of the
child (CPU; it includes the weights) or ``torch.cuda.max_memory_allocated`` (GPU), and the seconds per batch;
the modes alternate over ``--rounds`` rounds and the medians are printed with their ratio and the load average.

    .venv/bin/python bench/checkpoint_memory.py                          # ViT-L-14, CPU, batch 4
    .venv/bin/python bench/checkpoint_memory.py --device cuda --batch-size 32
    .venv/bin/python bench/checkpoint_memory.py --arch ViT-bigG-14 --device cuda --batch-size 32 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

GIB = 1024 ** 3


def child(args) -> None:
    import open_clip
    import torch

    from clipprune.models.open_clip_adapter import wrap_open_clip
    from clipprune.scoring import score_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    module = open_clip.create_model(args.arch, pretrained=None, device="cpu").float().eval()
    model = wrap_open_clip(module, f"open_clip:{args.arch}/random", open_clip.get_model_config(args.arch), args.arch)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    size = model.image_size
    batches = [(torch.randn(args.batch_size, 3, size, size, generator=gen).to(device),
                model.tokenizer([f"a photo of thing number {i}" for i in range(args.batch_size)]).to(device))
               for _ in range(args.batches)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    score_model(model, batches, criterion="fisher", loss="contrastive", towers="vision", progress=False,
                checkpointing=args.checkpointing, precision=args.precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.batches
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"peak_gib": peak / GIB, "s_per_batch": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-L-14")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = {False: [], True: []}
    for round_ in range(args.rounds):
        for mode in ((False, True) if round_ % 2 == 0 else (True, False)):
            cmd = [sys.executable, __file__, "--child", "--arch", args.arch, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--batches", str(args.batches),
                   "--precision", args.precision] + (["--checkpointing"] if mode else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    load = os.getloadavg()
    print(f"{args.arch} Fisher scoring on {args.device}, batch {args.batch_size}, {args.batches} batches, "
          f"{args.precision}, {args.rounds} round(s); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    peaks = {}
    for mode, rows in results.items():
        peaks[mode] = statistics.median(r["peak_gib"] for r in rows)
        print(f"  checkpointing {'on ' if mode else 'off'}: peak {peaks[mode]:.2f} GiB "
              f"({'max RSS, weights included' if args.device == 'cpu' else 'max allocated'}), "
              f"{statistics.median(r['s_per_batch'] for r in rows):.2f} s/batch")
    print(f"  RATIO peak with / without checkpointing: {peaks[True] / peaks[False]:.3f}")


if __name__ == "__main__":
    main()
