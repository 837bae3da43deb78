"""The distill stage as DVC runs it (stages/distill.py in a throwaway copy of the repo).

The copy gets the downloaded digits and an exported pruned model (the embedded default's tiny CLIP pruned by
random masks, written in-process); each test sets the few distill params it needs (32 images, batches of 8).
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from clipprune.distill import save_checkpoint
from clipprune.distill.checkpoint import Checkpoint, rng_state
from pipeline_utils import copy_repo, env, stage

PRUNED = "artifacts/models/pruned"
OUT = "artifacts/models/distilled"
LOGS = "reports/distill"
CHECKPOINT = "artifacts/checkpoints/distill/last.safetensors"
LIVE = "artifacts/checkpoints/distill/live"  # the logs of a run in progress (reach LOGS with the model)
SMALL = {"enabled": True, "mode": "distill", "loss": "mse", "nproc": 1, "num_samples": 32, "batch_size": 8,
         "epochs": 3, "warmup_steps": 2, "base_lr": 0.008}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from clipprune.models.pruned import export_pruned
    from clipprune.models import load_model
    from models import random_masks

    root = copy_repo(tmp_path_factory.mktemp("distill_stage") / "repo")
    proc = stage(root, "download")
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher = load_model("fixture:tiny_clip")
    export_pruned(teacher, random_masks(teacher, seed=5, real_valued=False, keep=0.5), root / PRUNED)
    return root


def set_distill(root: Path, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distill"].update({**SMALL, **changes})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def clean(root: Path) -> None:
    for rel in (OUT, LOGS, "artifacts/checkpoints"):
        shutil.rmtree(root / rel, ignore_errors=True)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def history(root: Path, name: str = "train/loss", logs: str = LOGS) -> list[tuple[int, float]]:
    rows = list(csv.DictReader(io.StringIO((root / logs / "plots" / "metrics" / f"{name}.tsv").read_text()),
                               delimiter="\t"))
    return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in rows]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), proc.stderr[-3000:]
    return lines[0]


def test_disabled_passes_the_pruned_model_through_byte_identically(repo):
    clean(repo)
    set_distill(repo, enabled=False)
    proc = stage(repo, "distill")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert files_of(repo / OUT) == files_of(repo / PRUNED)
    assert json.loads((repo / LOGS / "metrics.json").read_text()) == {"enabled": False}


@pytest.mark.slow
def test_enabled_run_writes_a_loadable_model_logs_and_no_checkpoint(repo):
    from clipprune.models.pruned import load_pruned

    clean(repo)
    set_distill(repo, epochs=2)
    proc = stage(repo, "distill")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = load_pruned(repo / OUT)
    pruned = load_pruned(repo / PRUNED)
    assert [v.as_dict() for v in model.towers["vision"].block_views()] == \
        [v.as_dict() for v in pruned.towers["vision"].block_views()]
    assert not torch.equal(model.module.visual.proj, pruned.module.visual.proj)
    assert [s for s, _ in history(repo)] == list(range(8)) and len(history(repo, "train/epoch_loss")) == 2
    summary = json.loads((repo / LOGS / "metrics.json").read_text())
    assert summary["epoch"] == 2 and summary["plan"]["mode"] == "distill"
    assert not (repo / CHECKPOINT).exists()  # only a killed run leaves one
    assert "wall_time_s" in json.loads((repo / "reports/timing/distill.json").read_text())
    assert "wall_time" not in (repo / OUT / "config.json").read_text()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_is_one_named_line_and_nothing_is_written(repo, damage):
    clean(repo)
    set_distill(repo)
    path = repo / CHECKPOINT
    path.parent.mkdir(parents=True)
    if damage == "truncated":
        save_checkpoint(path, Checkpoint(epoch=1, step=4, rng=rng_state()), "x")
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(b"not a checkpoint at all")
    line = one_line_error(stage(repo, "distill"))
    assert f"{CHECKPOINT}: corrupt or truncated" in line and "delete it to start over" in line, line
    assert not (repo / OUT).exists() and not (repo / LOGS).exists()


def test_checkpoint_of_other_params_is_refused(repo):
    clean(repo)
    set_distill(repo)
    path = repo / CHECKPOINT
    path.parent.mkdir(parents=True)
    save_checkpoint(path, Checkpoint(epoch=1, step=4, rng=rng_state()), "0" * 64)
    line = one_line_error(stage(repo, "distill"))
    assert f"{CHECKPOINT}: written by a run with other distill params" in line, line
    assert not (repo / OUT).exists()


@pytest.mark.parametrize("changes, key", [({"epochs": 0}, "distill.epochs")])  # more keys: test_config.py
def test_bad_params_exit_with_one_line_naming_the_key(repo, changes, key):
    clean(repo)
    set_distill(repo, **changes)
    line = one_line_error(stage(repo, "distill"))
    assert line.startswith(f"distill: error: {key}"), line
    assert not (repo / OUT).exists()


def _kill_during_second_epoch(root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "stages/distill.py"], cwd=root, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    import threading

    reader = threading.Thread(target=lambda: [chunks.append(c) for c in iter(lambda: proc.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    progress = re.compile(r"distill epoch 2/3:\s+\d+%\|[^|]*\|\s*[1-9]/4")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.search(b"".join(chunks).decode(errors="replace")):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        reader.join(5)
    assert proc.returncode == -signal.SIGKILL, b"".join(chunks).decode(errors="replace")[-2000:]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(repo):
    clean(repo)
    set_distill(repo)
    proc = stage(repo, "distill")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference, reference_log = files_of(repo / OUT), history(repo)
    clean(repo)

    _kill_during_second_epoch(repo)
    assert (repo / CHECKPOINT).is_file() and not (repo / OUT).exists() and not (repo / LOGS).exists()
    assert len(history(repo, logs=LIVE)) > 4  # the killed run logged steps past its checkpoint
    proc = stage(repo, "distill")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed after epoch 1" in proc.stdout
    assert files_of(repo / OUT) == reference  # bit-identical weights and config
    assert history(repo) == reference_log  # the log continues without doubled steps
    assert not (repo / CHECKPOINT).exists() and not (repo / LIVE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_two_processes_follow_the_one_process_trajectory(repo, loss):
    """Same global batch over 2 gloo processes: gradients are averaged in another order, so rtol 1e-4."""
    trajectories = {}
    for nproc in (1, 2):
        clean(repo)
        set_distill(repo, nproc=nproc, epochs=2, loss=loss)
        proc = stage(repo, "distill")
        assert proc.returncode == 0, proc.stderr[-3000:]
        trajectories[nproc] = history(repo)
    steps = [s for s, _ in trajectories[1]]
    assert steps == [s for s, _ in trajectories[2]] == list(range(8))
    one = torch.tensor([v for _, v in trajectories[1]], dtype=torch.float64)
    two = torch.tensor([v for _, v in trajectories[2]], dtype=torch.float64)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)
    assert float(one[-1]) < float(one[0])
