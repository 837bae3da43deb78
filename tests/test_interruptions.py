"""Interrupted stages: a kill never leaves a partial output, and a rerun gives the uninterrupted result.

Findings these tests pin down:
- ``score`` and ``tune`` write their outputs only after all the work, through ``io.atomic_path`` (temporary
  sibling, then rename). A SIGKILL during the work therefore leaves nothing; DVC removes a stage's outs
  before running it, so after a kill there is neither a stale nor a partial output.
- A SIGKILL *during* the (short) write leaves the temporary ``.<name>.<pid>.<random>.tmp`` behind: ``finally``
  never runs. The next write of the same target removes temporaries whose writer process is gone; those of
  live writers stay. Temporaries sit next to the target, never inside a DVC out, so DVC never records them.
- SIGINT and SIGTERM unwind the stage (``stages/_common.run_stage``), so they leave no temporary at all.

The stage tests run the real stages on 192 calibration pairs (6 score batches) and are slow.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from clipprune.io import atomic_dir, atomic_path
from pipeline_utils import REPO, copy_repo, dvc, env, stage

SCORES = "artifacts/scores/scores.safetensors"
SEARCHED = "artifacts/masks/search.safetensors"
TUNE_OUTS = ("artifacts/masks/rearranged.safetensors", "artifacts/masks/tuned.safetensors",
             "artifacts/masks/tune_report.json")
NUM_SAMPLES = 192  # score: 6 batches of 32, several seconds of work to interrupt
# a progress line showing at least one finished step: "<desc>:  8%|#  | 1/12 ["
SCORE_PROGRESS = re.compile(r"score fisher \([^)]*\):\s+\d+%\|[^|\r\n]*\|\s*[1-9]\d*/\d+")
TUNE_PROGRESS = re.compile(r"(?:^|[\r\n])tune:\s+\d+%\|[^|\r\n]*\|\s*[1-9]\d*/\d+")
_TEMPORARY = re.compile(r"^\..+\.tmp$|^\..+\.old$")


# ---------------------------------------------------------------- helpers

def leftovers(root: Path) -> list[str]:
    """Temporaries (``.<name>...tmp`` files or folders, ``.<name>.old``) anywhere under ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".dvc")]
        for name in dirnames + filenames:
            if _TEMPORARY.match(name):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def tensors_of(path: Path) -> dict[str, bytes]:
    """Every tensor of a safetensors file as (dtype, shape, raw bytes): equal means bit-identical."""
    with safe_open(str(path), framework="pt") as handle:
        out = {}
        for key in handle.keys():
            tensor = handle.get_tensor(key).contiguous()
            out[key] = (str(tensor.dtype), tuple(tensor.shape), tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return out


def without_timing(obj):
    """JSON-like ``obj`` with every key naming a wall-clock time dropped, at any depth."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if "wall_time" not in k}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


class StderrWatcher:
    """Collects a child's stderr on a thread (tqdm redraws with '\\r', so not line by line)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, pattern: re.Pattern, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern.search(self.text):
                return True
            if self.proc.poll() is not None:
                self.thread.join(5)
                return bool(pattern.search(self.text))
            time.sleep(0.05)
        return False


def kill_after_progress(repo: Path, name: str, progress: re.Pattern, timeout: float = 600) -> str:
    """Start ``stages/<name>.py``, SIGKILL it once its progress bar shows a finished step; return stderr."""
    # stderr is a pipe, not a terminal: a progress line per update (not one per 30 s) to know when to kill
    proc = subprocess.Popen([sys.executable, f"stages/{name}.py"], cwd=repo,
                            env={**env(), "CLIPPRUNE_PROGRESS_INTERVAL": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watcher = StderrWatcher(proc)
    try:
        seen = watcher.wait_for(progress, timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        watcher.thread.join(5)
    assert seen, f"no progress from {name} within {timeout} s:\n{watcher.text[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, f"{name} finished (exit {proc.returncode}) before the kill"
    return watcher.text


def dead_pid() -> int:
    """The pid of a process that has exited (reaped): what a killed writer leaves in its temporary's name."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def run_ok(repo: Path, name: str) -> None:
    proc = stage(repo, name)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"


# ---------------------------------------------------------------- the stages, killed (slow)

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A throwaway copy with download and calibrate (NUM_SAMPLES pairs) run."""
    root = copy_repo(tmp_path_factory.mktemp("interruptions") / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["calibrate"]["num_samples"] = NUM_SAMPLES
    params["score"]["batch_size"] = 32
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("download", "calibrate"):
        run_ok(root, name)
    return root


@pytest.mark.slow
def test_score_killed_mid_run_leaves_nothing_and_rerun_is_identical(repo):
    run_ok(repo, "score")
    reference = tensors_of(repo / SCORES)
    assert reference and all(data for _, _, data in reference.values())
    (repo / SCORES).unlink()  # what `dvc repro` does before running a stage

    kill_after_progress(repo, "score", SCORE_PROGRESS)
    assert not (repo / SCORES).exists()
    assert leftovers(repo) == []

    # what a SIGKILL during the write itself would leave (dead writer), and a live writer's temporary
    stale = repo / f"artifacts/scores/.scores.safetensors.{dead_pid()}.killed00.tmp"
    live = repo / f"artifacts/scores/.scores.safetensors.{os.getpid()}.writing0.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    try:
        # the rerun through DVC: the dead writer's temporary goes, the live one stays and is not recorded
        dvc(repo, "repro", "--single-item", "score")
        assert not stale.exists()
        assert live.exists()
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        assert [out["path"] for out in lock["stages"]["score"]["outs"]] == [SCORES, "reports/timing/score.json"]
        assert "changed" not in dvc(repo, "status", "score").stdout
    finally:
        live.unlink()
    assert tensors_of(repo / SCORES) == reference
    assert leftovers(repo) == []


@pytest.mark.slow
def test_tune_killed_mid_run_leaves_nothing_and_rerun_is_identical(repo):
    if not (repo / SCORES).exists():
        run_ok(repo, "score")
    run_ok(repo, "search")
    run_ok(repo, "tune")
    reference = {rel: tensors_of(repo / rel) for rel in TUNE_OUTS if rel.endswith(".safetensors")}
    report = without_timing(json.loads((repo / TUNE_OUTS[2]).read_text()))
    assert report["lsq"]["layers"], "tune did no least-squares work: nothing was interrupted"
    for rel in TUNE_OUTS:
        (repo / rel).unlink()

    kill_after_progress(repo, "tune", TUNE_PROGRESS)
    assert [rel for rel in TUNE_OUTS if (repo / rel).exists()] == []
    assert leftovers(repo) == []

    run_ok(repo, "tune")
    assert {rel: tensors_of(repo / rel) for rel in reference} == reference
    assert without_timing(json.loads((repo / TUNE_OUTS[2]).read_text())) == report
    assert leftovers(repo) == []


# ---------------------------------------------------------------- the atomic writers, killed (fast)

WRITER = """
import sys, time
sys.path.insert(0, {stages!r})
from _common import run_stage
from clipprune.io import atomic_dir, atomic_path

def main(params):
    with {writer}({target!r}) as tmp:
        if {is_dir}:
            (tmp / "weights.bin").write_bytes(b"partial")
        else:
            tmp.write_bytes(b"partial")
        print("writing", flush=True)
        time.sleep(300)

run_stage("writer", main, params_path={params!r})
"""


def start_writer(tmp_path: Path, target: Path, is_dir: bool) -> subprocess.Popen:
    """A stage (run through ``run_stage``) that stops in the middle of an atomic write of ``target``."""
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n")
    code = WRITER.format(stages=str(REPO / "stages"), writer="atomic_dir" if is_dir else "atomic_path",
                         target=str(target), is_dir=is_dir, params=str(params))
    # SIGINT back to its default in the child: a shell's Ctrl-C reaches a stage so, whereas a test worker may have
    # inherited it ignored from whatever started it (then Python never installs its KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    if line.strip() != "writing":
        proc.kill()
        pytest.fail(f"writer did not start: {line!r} {proc.communicate(timeout=60)[1][-2000:]}")
    return proc


@pytest.mark.parametrize("is_dir", [False, True], ids=["atomic_path", "atomic_dir"])
def test_sigkill_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path, is_dir):
    target = tmp_path / "out" / ("pruned" if is_dir else "scores.safetensors")
    proc = start_writer(tmp_path, target, is_dir)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    left = leftovers(tmp_path)  # finally never ran: the killed writer's temporary is still there
    assert len(left) == 1 and re.fullmatch(rf"out/\.{re.escape(target.name)}\.{proc.pid}\.\w+\.tmp", left[0]), left

    live = start_writer(tmp_path, target, is_dir)  # a concurrent writer: its temporary must survive
    try:
        writer = atomic_dir if is_dir else atomic_path
        with writer(target) as tmp:
            (tmp / "weights.bin" if is_dir else tmp).write_bytes(b"whole")
        assert (target / "weights.bin" if is_dir else target).read_bytes() == b"whole"
        assert [name.split(".")[-3] for name in leftovers(tmp_path)] == [str(live.pid)]
    finally:
        live.kill()
        live.communicate(timeout=60)


@pytest.mark.parametrize("how, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("is_dir", [False, True], ids=["atomic_path", "atomic_dir"])
def test_sigterm_and_sigint_mid_write_leave_nothing(tmp_path, is_dir, how, code):
    target = tmp_path / "out" / ("pruned" if is_dir else "scores.safetensors")
    proc = start_writer(tmp_path, target, is_dir)
    proc.send_signal(how)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == ["writer: interrupted; no outputs were written"]
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_temporaries_never_land_inside_a_dvc_out():
    """Atomic writers put temporaries beside the target: no out may contain another out's folder."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = []
    for spec in stages.values():
        for out in spec.get("outs", []) + spec.get("metrics", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            outs.append(Path(path.replace("${data.name}", params["data"]["name"])))
    assert len(outs) >= 8
    for out in outs:
        for other in outs:
            assert other not in out.parent.parents and other != out.parent, (out, other)
