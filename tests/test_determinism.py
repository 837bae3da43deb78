"""Determinism: the whole pipeline, run twice in two separate copies with the same seed, gives the same bits.

Two throwaway copies run every stage (download → evaluate_dense → evaluate, the stage scripts in order, as
`dvc repro` would; the two chains run concurrently, so neither depends on running alone). Compared:
calibration pairs, raw data, score tensors, search / rearranged / tuned masks, tune report, exported weights
and the cached dense evaluation (metrics and text embeddings) bit for bit; file metadata and metrics.json
exactly, except wall-clock keys (latency_ms, latency_ratio, latency_rounds, pruning_time_s, the summary block's
latency_ratio_image / latency_ratio_text and any key containing wall_time). Pruning params are the defaults but for 128 calibration pairs; evaluate is made cheaper (100
retrieval images, one latency repeat), which changes no pruning output.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from pipeline_utils import copy_repo, stage

pytestmark = pytest.mark.slow

PIPELINE = ("download", "calibrate", "score", "search", "tune", "export", "distill", "evaluate_dense", "evaluate")
SCORES = "artifacts/scores/scores.safetensors"
MASKS = ("artifacts/masks/search.safetensors", "artifacts/masks/rearranged.safetensors",
         "artifacts/masks/tuned.safetensors")
PRUNED = "artifacts/models/pruned"
DISTILLED = "artifacts/models/distilled"
DENSE_EVAL = "artifacts/eval/dense"
NUM_SAMPLES = 128  # calibration pairs (4 score batches): enough for every stage to do real work, and quick
TIMING_KEYS = {"latency_ms", "latency_ratio", "latency_rounds", "pruning_time_s", "latency_ratio_image",
               "latency_ratio_text"}


def without_timing(obj):
    """JSON-like ``obj`` without wall-clock keys, at any depth."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS and "wall_time" not in k}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, tuple], dict]:
    """(tensors as (dtype, shape, raw bytes), metadata with JSON values decoded) of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {}
        for key in handle.keys():
            tensor = handle.get_tensor(key).contiguous()
            tensors[key] = (str(tensor.dtype), tuple(tensor.shape), tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        metadata = {}
        for key, value in (handle.metadata() or {}).items():
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                metadata[key] = value
    return tensors, metadata


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_pipeline(root: Path, errors: dict) -> None:
    for name in PIPELINE:
        proc = stage(root, name)
        if proc.returncode != 0:
            errors[root] = f"{name} failed in {root}:\n{proc.stderr[-3000:]}"
            return


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two copies of the repo, each with the whole pipeline run (concurrently) on the same params."""
    roots = []
    for label in ("a", "b"):
        root = copy_repo(tmp_path_factory.mktemp(f"determinism_{label}") / "repo")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["calibrate"]["num_samples"] = NUM_SAMPLES
        params["evaluate"]["max_retrieval_images"] = 100
        params["evaluate"]["latency"] = {"batch_size": 4, "warmup": 0, "repeats": 1}
        params["distill"].update(num_samples=128, epochs=1, batch_size=32, warmup_steps=1)  # 4 real steps
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        roots.append(root)
    errors: dict = {}
    threads = [threading.Thread(target=run_pipeline, args=(root, errors)) for root in roots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, "\n".join(errors.values())
    return tuple(roots)


def test_raw_data_and_calibration_are_identical(runs):
    a, b = runs
    assert tree_digest(a / "data/raw/digits") == tree_digest(b / "data/raw/digits")
    calibration = (a / "data/prepared/calibration.json").read_bytes()
    assert calibration == (b / "data/prepared/calibration.json").read_bytes()
    assert len(json.loads(calibration)["pairs"]) == NUM_SAMPLES


def test_scores_are_bit_identical(runs):
    a, b = runs
    assert (a / SCORES).read_bytes() == (b / SCORES).read_bytes()  # header included: DVC hashes whole files
    (tensors_a, meta_a), (tensors_b, meta_b) = (read_safetensors(root / SCORES) for root in runs)
    assert set(tensors_a) >= {"vision.head", "vision.neuron", "vision.head.grads", "vision.neuron.grads"}
    assert tensors_a == tensors_b
    assert without_timing(meta_a) == without_timing(meta_b)
    head = torch.frombuffer(bytearray(tensors_a["vision.head"][2]), dtype=torch.float32)
    assert bool((head > 0).any()), "all-zero scores would make this comparison empty"


@pytest.mark.parametrize("rel", MASKS)
def test_masks_are_bit_identical(runs, rel):
    a, b = runs
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    (tensors_a, meta_a), (tensors_b, meta_b) = (read_safetensors(root / rel) for root in runs)
    assert set(tensors_a) == {"vision.head", "vision.neuron"}
    assert tensors_a == tensors_b
    assert without_timing(meta_a) == without_timing(meta_b)


def test_tune_report_is_identical_but_for_wall_time(runs):
    a, b = (json.loads((root / "artifacts/masks/tune_report.json").read_text()) for root in runs)
    assert a["lsq"]["layers"]
    assert without_timing(a) == without_timing(b)


@pytest.mark.parametrize("rel", (PRUNED, DISTILLED))
def test_exported_and_distilled_models_are_identical(runs, rel):
    a, b = runs
    assert tree_digest(a / rel) == tree_digest(b / rel)
    weights_a, _ = read_safetensors(a / rel / "model.safetensors")
    weights_b, _ = read_safetensors(b / rel / "model.safetensors")
    assert weights_a == weights_b and len(weights_a) > 10


def test_distillation_changed_the_model(runs):
    a, _ = runs
    pruned, _ = read_safetensors(a / PRUNED / "model.safetensors")
    distilled, _ = read_safetensors(a / DISTILLED / "model.safetensors")
    assert pruned.keys() == distilled.keys() and pruned != distilled


def test_dense_evaluation_is_bit_identical(runs):
    a, b = runs
    digest = tree_digest(a / DENSE_EVAL)
    assert set(digest) == {"metrics.json", "text_embeddings.safetensors"}
    assert digest == tree_digest(b / DENSE_EVAL)


def test_metrics_are_equal_except_timing(runs):
    a, b = (json.loads((root / "reports/metrics.json").read_text()) for root in runs)
    assert {"dense", "pruned", "steps"} <= set(a)
    assert "latency_ms" in a["pruned"] and "pruning_time_s" in a  # the keys left out exist
    assert without_timing(a) == without_timing(b)
    assert without_timing(a)["pruned"]["zeroshot"]["acc1"] > 0.5


def test_the_seed_drives_the_calibration_sample(runs):
    """The control: the comparison above can tell runs apart, since another seed picks other pairs."""
    from clipprune.data.calibration import sample_calibration_pairs
    from clipprune.data.coco import CocoCaptions

    root = runs[0]
    digits = root / "data/raw/digits/digits"
    dataset = CocoCaptions(digits / "images/train", digits / "annotations/captions_train.json")
    recorded = json.loads((root / "data/prepared/calibration.json").read_text())
    seed0, seed1 = (sample_calibration_pairs(dataset, NUM_SAMPLES, seed) for seed in (0, 1))
    assert recorded["pairs"] == seed0 and len(seed0) == NUM_SAMPLES
    assert seed0 != seed1
