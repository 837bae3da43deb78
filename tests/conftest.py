"""Test ordering for `pytest -n 2 --dist loadfile` (what `make test` runs).

xdist hands whole files to its workers in collection order; the few files that reproduce a pipeline take
minutes each, so they go first and the many quick files fill the gaps on the other worker. Without xdist
the order changes nothing but the order of the output.
"""
from __future__ import annotations

# the files that run whole pipelines, longest first (measured with --durations)
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_remotes.py", "test_sweep.py", "test_determinism.py",
                 "test_interruptions.py", "test_bad_inputs_pruning.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name))
        return (1, 0) if item.get_closest_marker("slow") else (2, 0)

    items.sort(key=rank)  # stable: tests keep their order within a file
