"""sparsity.nproc: every method's new weights with 2 gloo processes under torchrun equal one process's, bit for bit.

One worker script runs each method (CAP with two chunks of layers and with recomputation, CAP 2:4, FastCAP,
SparseGPT, Wanda) on five calibration batches of uneven sizes, ``num_grads`` cutting the fourth batch, once as a
plain process and once as 2 torchrun processes (1 BLAS thread each, so the per-batch floats are the same); the
per-sample gradient rows themselves are compared too. Batch ``i`` is computed by rank ``i mod 2`` and every rank
receives every batch in order (``distributed.shard_rounds``), so the results are equal, not merely close.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipprune.distributed import torchrun_command

TESTS = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from models import tiny_open_clip
    from scoring import batches
    from clipprune.distributed import data_parallel, init_distributed
    from clipprune.sparsity import SparsityConfig, sparsify
    from clipprune.sparsity.grads import per_sample_gradients
    from clipprune.sparsity.layers import prunable_linears

    RUNS = {{
        "cap_chunks": dict(method="cap", chunk_layers=2),
        "cap_steps": dict(method="cap", num_recomputations=2, targets=(0.6,)),
        "cap_2of4": dict(method="cap", mask_type="2:4"),
        "fastcap": dict(method="fastcap"),
        "sparsegpt": dict(method="sparsegpt"),
        "wanda_2of4": dict(method="wanda", mask_type="2:4"),
    }}

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    out = {{}}
    with data_parallel(ctx):
        model = tiny_open_clip(seed=0)
        loader = batches(model, sizes=(4, 4, 4, 3, 2), seed=1)
        layers = prunable_linears(model, ("vision", "text"))
        rows = [dict(batch) for batch in per_sample_gradients(model, loader, layers, loss="contrastive",
                                                              num_grads=13, progress=False)]
        for name in layers:
            out[f"grads/{{name}}"] = torch.cat([batch[name] for batch in rows])
        for run, settings in RUNS.items():
            config = SparsityConfig(**{{"targets": (0.5, 0.75), "towers": ("vision", "text"), "batch_size": 4,
                                        "num_grads": 13, "fisher_block_size": 16, **settings}})
            result = sparsify(model, config, loader, seed=0, progress=False)
            for target, weights in result.weights.items():
                for name, weight in weights.items():
                    out[f"{{run}}/{{target}}/{{name}}"] = weight
    if ctx.is_main:
        save_file(out, sys.argv[1])
    ctx.close()
''')


def _run(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIPPRUNE_DIST_TIMEOUT_S": "120"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_processes_prune_every_method_exactly_like_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    _run([sys.executable, str(script), str(tmp_path / "one.safetensors")], tmp_path)
    _run(torchrun_command(str(script), 2, [str(tmp_path / "two.safetensors")]), tmp_path)
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    assert {key.partition("/")[0] for key in one} == {"grads", "cap_chunks", "cap_steps", "cap_2of4", "fastcap",
                                                      "sparsegpt", "wanda_2of4"}
    assert all(value.shape[0] == 13 for key, value in one.items() if key.startswith("grads/"))  # 4 + 4 + 4 + 1
    different = [key for key in one if not torch.equal(one[key], two[key])]
    assert not different, different
    for run in ("cap_chunks", "cap_steps", "cap_2of4", "fastcap", "sparsegpt", "wanda_2of4"):  # they did prune
        weights = [value for key, value in one.items() if key.startswith(f"{run}/")]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros > 0.45, (run, zeros)
