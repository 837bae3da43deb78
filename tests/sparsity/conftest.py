"""Fixtures the sparsity tests share: the tiny open_clip model and three calibration batches of it."""
import pytest

from models import tiny_open_clip
from scoring import batches


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip(seed=0)


@pytest.fixture(scope="module")
def loader(model):
    return batches(model, sizes=(4, 4, 4), seed=1)
