"""Test scheduling for `pytest -n 2 --dist loadfile` (what `make test` runs), and the one shared pipeline.

xdist hands whole scopes to its workers in collection order. A scope is a test file, except that the files
of ``SHARED_PIPELINE`` form one scope: they run on one worker and share one `dvc repro` of the embedded
default (the session fixture ``default_pipeline``). The scheduler is xdist's own file scheduler with that
one change (``pytest_xdist_make_scheduler``; xdist's ``xdist_group`` marks do not take effect with pytest 9,
whose node ids xdist 3.8 can no longer rewrite). The scopes that reproduce pipelines take minutes each, so
they go first and the many quick files fill the gaps on the other worker. Without xdist the scheduling
changes nothing and the order only the order of the output.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# ``fixture:<name>`` models come from the folder in CLIPPRUNE_FIXTURES (the stages set it; so do the tests)
os.environ.setdefault("CLIPPRUNE_FIXTURES", str(Path(__file__).resolve().parents[1] / "data" / "fixtures"))

# the files that run whole pipelines, longest first (measured with --durations)
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_sweep.py", "test_remotes.py", "test_determinism.py",
                 "test_interruptions.py", "test_bad_inputs_pruning.py", "test_bad_inputs.py")
# the files that use the session's reproduced embedded default (``default_pipeline``): one worker runs them
SHARED_PIPELINE = ("test_pipeline_e2e.py", "test_sweep.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name))
        return (1, 0) if item.get_closest_marker("slow") else (2, 0)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without xdist
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedPipelineScheduling(LoadFileScheduling):
        """Whole files, as ``--dist loadfile``, but the ``SHARED_PIPELINE`` files as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "default_pipeline" if path.rsplit("/", 1)[-1] in SHARED_PIPELINE else path

    return SharedPipelineScheduling(config, log)


# the shared pipeline's changes to params.yaml, for the CI's critical path (what the shared files test: stages,
# caching, reports, experiments, does not depend on them): CAP's Fisher from 64 gradients instead of 512 (the
# calibration set; sparse_prune 89 -> 29 s of CPU), one sparsity target instead of three (two sparsify stages
# fewer), 2 distillation epochs instead of 3 (still 92.5 -> 96.1 top-1, measured)
SHARED_PIPELINE_PARAMS = {"sparsity": {"num_grads": 64, "targets": [0.5]}, "distill": {"epochs": 2}}


@pytest.fixture(scope="session")
def default_pipeline(tmp_path_factory):
    """A throwaway copy of the repo with the embedded default reproduced (`dvc repro`, log in repro.log next
    to it; ``SHARED_PIPELINE_PARAMS`` applied and committed first), built once per worker and shared by the
    ``SHARED_PIPELINE`` files, which one worker runs."""
    import yaml

    from pipeline_utils import copy_repo, dvc, git

    repo = copy_repo(tmp_path_factory.mktemp("default_pipeline") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SHARED_PIPELINE_PARAMS.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "commit", "-qam", "shared pipeline params")
    (repo.parent / "repro.log").write_text(dvc(repo, "repro").stdout)
    return repo
