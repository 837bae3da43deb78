"""Shared fixtures: a small digits archive (3 images per class and split) built once per session."""
from __future__ import annotations

import pytest

from clipprune.data.archive import fetch_and_extract
from fixture_scripts import digits_dataset

SMALL_PER_CLASS = 3


@pytest.fixture(scope="session")
def digits_small_zip(tmp_path_factory):
    """Path of a digits zip with 3 train and 3 val images per class (seed 0)."""
    return digits_dataset.build_digits_archive(tmp_path_factory.mktemp("zip") / "digits_small.zip", seed=0,
                                limit_per_class=SMALL_PER_CLASS)


@pytest.fixture(scope="session")
def digits_small_root(digits_small_zip, tmp_path_factory):
    """The extracted ``digits/`` folder of the small archive (treat as read-only)."""
    target = tmp_path_factory.mktemp("raw") / "digits"
    fetch_and_extract(digits_small_zip, target, progress=False)
    return target / "digits"
