"""Calibration sampling (seeded, spread over images) and the calibration file."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from clipprune.data.calibration import read_calibration, sample_calibration_pairs, write_calibration
from clipprune.data.coco import CocoCaptions
from clipprune.errors import DataError, ParamError

from .conftest import SMALL_PER_CLASS

N_IMAGES = 10 * SMALL_PER_CLASS
N_PAIRS = 5 * N_IMAGES


@pytest.fixture(scope="module")
def train(digits_small_root):
    return CocoCaptions(digits_small_root / "images" / "train", digits_small_root / "annotations" / "captions_train.json")


def as_tuples(pairs):
    return [(p["image_id"], p["annotation_id"]) for p in pairs]


def test_same_seed_same_list_different_seed_different(train):
    a = sample_calibration_pairs(train, 12, seed=0)
    b = sample_calibration_pairs(train, 12, seed=0)
    c = sample_calibration_pairs(train, 12, seed=1)
    assert a == b
    assert a != c


def test_independent_of_global_random_state(train):
    np.random.seed(1)
    torch.manual_seed(1)
    a = sample_calibration_pairs(train, 20, seed=3)
    np.random.seed(2)
    torch.manual_seed(2)
    assert sample_calibration_pairs(train, 20, seed=3) == a


def test_pairs_are_valid_and_distinct_images_first(train):
    valid = set(train.pairs())
    few = as_tuples(sample_calibration_pairs(train, N_IMAGES - 5, seed=0))
    assert set(few) <= valid
    assert len({i for i, _ in few}) == len(few)  # one caption per image while images last
    more = as_tuples(sample_calibration_pairs(train, N_IMAGES + 7, seed=0))
    per_image = Counter(i for i, _ in more)
    assert len(per_image) == N_IMAGES and max(per_image.values()) == 2
    assert len(set(more)) == len(more)
    everything = as_tuples(sample_calibration_pairs(train, N_PAIRS, seed=0))
    assert sorted(everything) == sorted(valid)


def test_images_are_drawn_at_random(train):
    """A small sample is a random subset of images in random order, not the first ids."""
    subsets = [[i for i, _ in as_tuples(sample_calibration_pairs(train, 8, seed))] for seed in range(3)]
    assert len({frozenset(s) for s in subsets}) == 3
    assert any(s != sorted(s) for s in subsets)


def test_captions_vary_across_seeds(train):
    """The caption chosen per image is random, not always the first annotation."""
    chosen = set()
    for seed in range(5):
        chosen |= {a % 10 for _, a in as_tuples(sample_calibration_pairs(train, N_IMAGES, seed))}
    assert len(chosen) > 2


def test_num_samples_above_available_pairs(train):
    with pytest.raises(ParamError) as err:
        sample_calibration_pairs(train, N_PAIRS + 1, seed=0)
    assert str(err.value) == (f"calibrate.num_samples must be <= {N_PAIRS} (pairs in {train.annotation_file}), "
                              f"got {N_PAIRS + 1}")


def test_write_read_round_trip(tmp_path, train):
    pairs = sample_calibration_pairs(train, 10, seed=0)
    path = tmp_path / "prepared" / "calibration.json"
    write_calibration(path, pairs, {"seed": 0, "source": str(train.annotation_file)})
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temp files left
    got, meta = read_calibration(path, dataset=train)
    assert got == pairs and meta["seed"] == 0
    assert json.loads(path.read_text())["num_samples"] == 10


def test_read_errors(tmp_path, train):
    with pytest.raises(DataError, match=r"calibration\.json: calibration file not found"):
        read_calibration(tmp_path / "calibration.json")
    path = tmp_path / "cal.json"
    for content, message in [
        ("{", "not valid JSON"),
        ("[]", "missing key 'pairs'"),
        ('{"pairs": []}', "'pairs' is empty"),
        ('{"pairs": [{"image_id": 1}]}', r"pairs\[0\] must be an object with image_id and annotation_id"),
        ('{"pairs": [{"image_id": 1, "annotation_id": "x"}]}', r"pairs\[0\] ids must be integers"),
        ('{"pairs": [{"image_id": 1, "annotation_id": 10}, {"image_id": 1, "annotation_id": 10}]}',
         r"pairs\[1\] repeats"),
        ('{"pairs": [{"image_id": 1, "annotation_id": 10}], "num_samples": 2}', "num_samples is 2"),
    ]:
        path.write_text(content)
        with pytest.raises(DataError, match=rf"cal\.json: {message}"):
            read_calibration(path)
    foreign = train.image_ids[0]
    path.write_text(json.dumps({"pairs": [{"image_id": foreign, "annotation_id": foreign * 10 + 9}]}))
    with pytest.raises(DataError, match=r"cal\.json: pairs\[0\] .* is not in .*captions_train\.json"):
        read_calibration(path, dataset=train)
