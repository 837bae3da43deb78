"""The held-out split: pairs of images calibration did not use, deterministic per seed."""
import pytest

from clipprune.data.holdout import holdout_pairs
from clipprune.errors import ParamError


class FakeCaptions:
    """The parts of CocoCaptions that holdout_pairs reads."""

    annotation_file = "captions_train.json"

    def __init__(self, images=20, captions=3):
        self.image_ids = list(range(1, images + 1))
        self._anns = {i: [100 * i + k for k in range(captions)] for i in self.image_ids}

    def annotation_ids(self, image_id):
        return list(self._anns[image_id])


def test_holdout_pairs_disjoint_deterministic():
    dataset = FakeCaptions()
    calibration = [{"image_id": i, "annotation_id": 100 * i} for i in range(1, 13)]
    pairs = holdout_pairs(dataset, calibration, 6, seed=0)
    assert pairs == holdout_pairs(dataset, calibration, 6, seed=0)
    assert pairs != holdout_pairs(dataset, calibration, 6, seed=1)
    images = [p["image_id"] for p in pairs]
    assert len(set(images)) == 6 and not set(images) & set(range(1, 13))
    assert all(p["annotation_id"] in dataset.annotation_ids(p["image_id"]) for p in pairs)
    with pytest.raises(ParamError, match=r"^search\.holdout_samples must be <= 8 "):
        holdout_pairs(dataset, calibration, 9, seed=0)
