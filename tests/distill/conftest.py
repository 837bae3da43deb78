"""Shared fixtures of the distillation tests: a small digits split and a tiny teacher / pruned student pair."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipprune.data.archive import fetch_and_extract
from clipprune.models.pruned import export_pruned, load_pruned
from fixture_scripts import digits_dataset
from models import OPEN_CLIP_CFG, random_masks, tiny_open_clip

PER_CLASS = 4  # 40 train images
# the tests' tiny open_clip with the real BPE vocabulary, so captions can be tokenised for the text tower
CFG = {**OPEN_CLIP_CFG, "text_cfg": {**OPEN_CLIP_CFG["text_cfg"], "vocab_size": 49408}}


def make_teacher():
    return tiny_open_clip(seed=0, model_cfg=CFG)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: threads only add contention
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory) -> tuple[Path, Path]:
    """(train images dir, train captions file) of a digits archive with 4 images per class and split."""
    archive = digits_dataset.build_digits_archive(tmp_path_factory.mktemp("distill_zip") / "digits.zip", seed=0,
                                   limit_per_class=PER_CLASS)
    target = tmp_path_factory.mktemp("distill_raw") / "digits"
    fetch_and_extract(archive, target, progress=False)
    root = target / "digits"
    return root / "images" / "train", root / "annotations" / "captions_train.json"


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory) -> Path:
    """A random tiny open_clip teacher pruned by random masks (both towers) and exported."""
    teacher = make_teacher()
    out = tmp_path_factory.mktemp("distill_pruned") / "pruned"
    export_pruned(teacher, random_masks(teacher, seed=5, real_valued=False, keep=0.5), out)
    return out


@pytest.fixture
def teacher():
    return make_teacher()


@pytest.fixture
def student(pruned_dir):
    return load_pruned(pruned_dir)


@pytest.fixture(scope="session")
def trained_pruned_dir(tmp_path_factory) -> Path:
    """The embedded default's trained tiny CLIP, pruned by random masks: a teacher whose pseudo-labels mean
    something (a random teacher's image-caption argmax is noise that no student can follow)."""
    from clipprune.models import load_model

    teacher = load_model("fixture:tiny_clip")
    out = tmp_path_factory.mktemp("distill_trained_pruned") / "pruned"
    export_pruned(teacher, random_masks(teacher, seed=5, real_valued=False, keep=0.5), out)
    return out
