"""clipprune.distributed: sharding by whole batches, gathering in the original order, and a failing rank.

The gather and failure tests run a real 2-process gloo group under torchrun (through stages/_common.relaunch,
what the stages use); the sharding tests need no process group.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from clipprune.distributed import DistContext, shard_batches, timeout_s
from clipprune.errors import ClipPruneError

STAGES = Path(__file__).resolve().parents[1] / "stages"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_batches_gives_batch_i_to_rank_i_mod_n_and_reads_only_its_own(world):
    from torch.utils.data import DataLoader

    reads = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            reads.append(index)
            return torch.tensor([index])

    loader = DataLoader(Recording(), batch_size=3, shuffle=False)
    full = [batch.view(-1).tolist() for batch in loader]
    seen = []
    for rank in range(world):
        reads.clear()
        shard = shard_batches(loader, DistContext(rank=rank, world=world))
        got = list(shard)
        assert [i for i, _ in got] == list(range(rank, len(full), world)) and len(shard) == len(got)
        assert [b.view(-1).tolist() for _, b in got] == [full[i] for i in range(rank, len(full), world)]
        assert sorted(reads) == sorted(x for i in range(rank, len(full), world) for x in full[i])
        seen += [i for i, _ in got]
    assert sorted(seen) == list(range(len(full)))  # disjoint and complete
    # any other iterable: the others' batches are skipped
    assert [i for i, _ in shard_batches(iter("abcde"), DistContext(rank=1, world=2))] == [1, 3]


def test_one_process_helpers_are_the_identity():
    ctx = DistContext()
    parts = [torch.ones(2, 3), torch.zeros(1, 3)]
    assert ctx.gather_batches(parts) == parts and ctx.gather_json([["a"], ["b"]]) == [["a"], ["b"]]
    assert torch.equal(ctx.all_reduce_sum(torch.tensor([2.0])), torch.tensor([2.0]))


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPPRUNE_DIST_TIMEOUT_S", "12.5")
    assert timeout_s() == 12.5
    monkeypatch.setenv("CLIPPRUNE_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ClipPruneError, match="CLIPPRUNE_DIST_TIMEOUT_S must be a positive number"):
        timeout_s()


WORKER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {stages!r})
    import torch
    from _common import relaunch, run_stage
    from clipprune.distributed import data_parallel, init_distributed, shard_batches
    from clipprune.tuning.lsq import LeastSquaresStats
    from clipprune.errors import ClipPruneError

    OUT = Path(sys.argv[sys.argv.index("--out") + 1])


    def batch(i):  # rows vary from batch to batch, like a short last batch
        return torch.arange(10.0 * i, 10.0 * i + 1 + i % 3, dtype=torch.float64).view(-1, 1).repeat(1, 2)


    def main(params):
        if relaunch("boom", 2, {{"out": OUT}}, script=__file__):
            return
        ctx = init_distributed("cpu")
        try:
            mine = [i for i, _ in shard_batches(range(7), ctx)]
            got = ctx.gather_batches([batch(i) for i in mine])
            assert len(got) == 7 and all(torch.equal(g, batch(i)) for i, g in enumerate(got)), got
            assert ctx.gather_json([[f"caption {{i}}", i] for i in mine]) == [[f"caption {{i}}", i] for i in range(7)]
            assert int(ctx.all_reduce_sum(torch.tensor([ctx.rank + 1]))) == 3
            # tune.nproc: least-squares statistics of each rank's batches, all-reduced, equal one process's
            gen = torch.Generator().manual_seed(0)
            columns = torch.randn(6, 4, generator=gen)
            data = [(torch.randn(5, 4, generator=gen), torch.randn(5, 6, generator=gen)) for _ in range(5)]
            whole, shared = LeastSquaresStats(columns, 2), LeastSquaresStats(columns, 2)
            for features, residual in data:
                whole.add(features, residual)
            for i, _ in shard_batches(range(5), ctx):
                shared.add(*data[i])
            with data_parallel(ctx):
                shared.reduce()
            for got, want in zip(shared.system(), whole.system()):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            assert shared.tokens == whole.tokens == 25
            assert abs(shared.target_sq - whole.target_sq) <= 1e-9 * whole.target_sq
            if os.environ.get("FAIL_RANK") == str(ctx.rank):
                raise ClipPruneError("boom.data: shard unreadable")
            ctx.barrier()  # the other rank waits here for the failed one: torchrun (or the timeout) ends it
            if ctx.is_main:
                OUT.write_text("ok")
        finally:
            ctx.close()


    run_stage("boom", main)
''')


def _run_boom(tmp_path: Path, fail_rank: str | None) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    script = tmp_path / "boom.py"
    script.write_text(WORKER.format(stages=str(STAGES)))
    env = {**os.environ, "CLIPPRUNE_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    env.pop("FAIL_RANK", None)
    if fail_rank is not None:
        env["FAIL_RANK"] = fail_rank
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out.txt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    return proc, time.perf_counter() - start


def test_a_failing_rank_stops_every_rank_with_its_one_line_error_and_writes_nothing(tmp_path):
    """One torchrun launch (they cost ~10 s): both ranks first check gather_batches / gather_json /
    all_reduce_sum against the batches in order and tune's all-reduced least-squares statistics against one
    process's (a failed check would be a traceback and exit 2), then rank 1 fails while rank 0 waits in a
    barrier."""
    proc, elapsed = _run_boom(tmp_path, "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "boom: error: rank 1: boom.data: shard unreadable" in lines  # the worker's own line
    assert lines[-1] == "boom: error: boom.nproc=2: rank 1: boom.data: shard unreadable"  # the launcher's
    assert elapsed < 60  # torchrun stopped rank 0 long before the process group's timeout
    assert not (tmp_path / "out.txt").exists()
