"""score, evaluate_dense and sparse_prune with 2 gloo processes under torchrun equal the 1-process run (the one
slow test).

Scores: batch i is computed by rank i mod 2 and the Fisher sums are formed after the gather, in batch order,
so the per-batch gradient rows, the scores and the searched masks are equal; the scores are asserted to
1e-6 relative (the workers run 1 BLAS thread each, the single process its default), the masks exactly.
Evaluation: image and text embeddings are gathered in the original order; the metrics agree to 1e-6.
sparse_prune (SparseGPT, whose layer-input sums are gathered and added in batch order): the 1-process run gets
one BLAS thread too, and the artifact is byte-identical (every method is checked bit for bit, without the
stages, in tests/sparsity/test_data_parallel.py).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from pipeline_utils import copy_repo, env, stage

SCORES = "artifacts/scores/scores.safetensors"
SPARSE = "artifacts/sparse/pruned.safetensors"
DENSE = "artifacts/eval/dense/metrics.json"


def set_params(root, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def flat(metrics, prefix=""):
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


@pytest.mark.slow
def test_two_processes_score_and_evaluate_like_one(tmp_path):
    from clipprune.models import load_model
    from clipprune.scoring import load_scores
    from clipprune.search import check_scores, get_search

    root = copy_repo(tmp_path / "repo")
    set_params(root, calibrate={"num_samples": 48}, score={"batch_size": 16},
               evaluate={"max_retrieval_images": 48, "batch_size": 64},
               sparsity={"method": "sparsegpt", "batch_size": 16, "num_grads": 40, "targets": [0.5, 0.75]})
    for name in ("download", "calibrate"):
        proc = stage(root, name)
        assert proc.returncode == 0, proc.stderr[-2000:]
    results = {}
    for nproc in (1, 2):
        set_params(root, score={"nproc": nproc}, evaluate={"nproc": nproc}, sparsity={"nproc": nproc})
        for name in ("score", "evaluate_dense"):
            proc = stage(root, name)
            assert proc.returncode == 0, proc.stderr[-3000:]
        proc = stage(root, "sparse_prune", environment={**env(), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = (load_scores(root / SCORES), json.loads((root / DENSE).read_text()),
                          (root / SPARSE).read_bytes())
        shutil.rmtree(root / "artifacts")
    (one, dense_one, sparse_one), (two, dense_two, sparse_two) = results[1], results[2]
    assert sparse_one == sparse_two
    assert one.meta == two.meta  # timings are not in the artifact
    assert one.meta["num_batches"] == 3 and set(one.tensors()) == set(two.tensors())
    for key, value in one.tensors().items():
        torch.testing.assert_close(two.tensors()[key], value, rtol=1e-6, atol=0)
    model = load_model("fixture:tiny_clip")
    views = {tower: model.towers[tower].block_views() for tower in check_scores(one.scores, {
        t: model.towers[t].block_views() for t in model.towers})}
    search = get_search("mac")
    masks = [search(result.scores, views, 0.5, "mac") for result in (one, two)]
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][key], masks[1][key]) for key in masks[0])
    a, b = flat(dense_one["metrics"]), flat(dense_two["metrics"])
    assert a.keys() == b.keys() and "zeroshot.acc1" in a and "retrieval.image_retrieval_recall@1" in a
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
