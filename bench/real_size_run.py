"""A real-size `dvc repro`: open_clip ViT-B/32 with random weights on the digits data, per-stage wall time and
peak memory, and the share of the run spent evaluating.

    .venv/bin/python bench/real_size_run.py                        # calibrate.num_samples 2048 (README recipe)
    .venv/bin/python bench/real_size_run.py --samples 64 --json reports/bench_real_size.json
    .venv/bin/python bench/real_size_run.py --arch ViT-B-32-quickgelu --keep /tmp/run

The tracked files of this checkout are copied into a scratch folder (a fresh git repo); the model is
`open_clip.create_model(arch, pretrained=None)` saved as a local safetensors file (nothing is downloaded);
params are the README's real-size recipe where the digits data allow it (`evaluate.steps: false`,
`distill.enabled: false`, vision tower). Then `dvc repro <target>` runs while a sampler records the resident
memory of the process tree every 0.2 s. Each stage's wall time is its own `<stage>: done in X s` line;
its peak memory is the largest sample taken while it ran. Evaluation means `evaluate_dense` + `evaluate`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
EVALUATION = ("evaluate_dense", "evaluate")
GIB = 2 ** 30


def copy_checkout(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@localhost",
                                                 "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def save_random_model(arch: str, path: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


class TreeMemory:
    """Samples the resident memory of a process and its children; ``peaks[stage]`` while ``stage`` runs."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.stage = None
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                continue
            if self.stage is not None:
                self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)


def run_repro(repo: Path, target: str) -> tuple[dict, dict, float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro", target], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    times: dict[str, float] = {}
    log = []
    for line in proc.stdout:
        log.append(line)
        running = re.match(r"Running stage '([^']+)'", line)
        if running:
            memory.stage = running.group(1)
        done = re.match(r"(\w+): done in ([0-9.]+) s", line.strip())
        if done:
            times[done.group(1)] = float(done.group(2))
    code = proc.wait()
    total = time.perf_counter() - start
    memory.stop.set()
    if code != 0:
        sys.exit(f"real_size_run: dvc repro failed (exit {code}):\n{''.join(log)[-3000:]}")
    return times, memory.peaks, total, "".join(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--samples", type=int, default=2048, help="calibrate.num_samples (README recipe: 2048)")
    parser.add_argument("--target", default="report", help="dvc repro target (default: the main chain)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="clipprune-real-size-"))
    try:
        repo = copy_checkout(work / "repo")
        model_file = "weights/model.safetensors"
        (repo / "weights").mkdir()
        save_random_model(args.arch, repo / model_file)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["model"] = f"open_clip:{args.arch}/{model_file}"
        params["model_files"] = model_file
        params["calibrate"]["num_samples"] = args.samples
        params["evaluate"]["steps"] = False
        params["distill"]["enabled"] = False
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        load = os.getloadavg()[0]
        times, peaks, total, _ = run_repro(repo, args.target)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    evaluation = sum(times.get(s, 0.0) for s in EVALUATION)
    staged = sum(times.values())
    print(f"{args.arch}, random weights, digits data, calibrate.num_samples {args.samples}, "
          f"load average at start {load:.2f}; `dvc repro {args.target}` {total:.0f} s in all")
    print(f"{'stage':<16} {'wall s':>8} {'peak RSS GiB':>13}")
    for name, seconds in times.items():
        print(f"{name:<16} {seconds:>8.1f} {peaks.get(name, 0) / GIB:>13.2f}")
    print(f"evaluation (evaluate_dense + evaluate): {evaluation:.0f} s of {staged:.0f} s in stages = "
          f"{evaluation / staged:.0%} (goal <= 30%); without evaluate_dense (cached after the first run): "
          f"{times.get('evaluate', 0.0) / (staged - times.get('evaluate_dense', 0.0)):.0%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": args.arch, "samples": args.samples, "load_average": load,
                                         "total_s": total, "stage_s": times,
                                         "peak_rss_bytes": peaks, "evaluation_share": evaluation / staged},
                                        indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
