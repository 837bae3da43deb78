"""Test scheduling for `pytest -n 2 --dist loadgroup` (what `make test` runs), and the one shared pipeline.

xdist hands whole groups to its workers in collection order. Every test file is its own group (as with
``--dist loadfile``), except the files marked ``xdist_group("default_pipeline")``: those run on one worker
and share one `dvc repro` of the embedded default (the session fixture ``default_pipeline``). The few groups
that reproduce pipelines take minutes each, so they go first and the many quick files fill the gaps on the
other worker. Without xdist the grouping changes nothing and the order only the order of the output.
"""
from __future__ import annotations

import pytest

# the files that run whole pipelines, longest first (measured with --durations)
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_sweep.py", "test_remotes.py", "test_determinism.py",
                 "test_interruptions.py", "test_bad_inputs_pruning.py", "test_bad_inputs.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group marks into node ids
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))

    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name))
        return (1, 0) if item.get_closest_marker("slow") else (2, 0)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(scope="session")
def default_pipeline(tmp_path_factory):
    """A throwaway copy of the repo with the embedded default reproduced (`dvc repro`, log in repro.log next
    to it), built once per worker and shared by the files of the ``default_pipeline`` group."""
    from pipeline_utils import copy_repo, dvc

    repo = copy_repo(tmp_path_factory.mktemp("default_pipeline") / "repo")
    (repo.parent / "repro.log").write_text(dvc(repo, "repro").stdout)
    return repo
