"""ImageFolderClassification and the classnames / templates loaders."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torchvision.transforms import ToTensor

from clipprune.data.imagefolder import ImageFolderClassification, load_classnames, load_templates
from clipprune.errors import DataError

from .conftest import SMALL_PER_CLASS


def test_loads_built_digits_classification(digits_small_root):
    cls_root = digits_small_root / "classification"
    classnames = load_classnames(cls_root / "classnames.json")
    templates = load_templates(cls_root / "templates.json")
    assert classnames[3] == "three" and all("{c}" in t for t in templates)
    ds = ImageFolderClassification(cls_root / "val", classnames, transform=ToTensor())
    assert len(ds) == 10 * SMALL_PER_CLASS
    assert sorted(set(ds.targets)) == list(range(10))
    assert all(ds.targets.count(k) == SMALL_PER_CLASS for k in range(10))
    for index in (0, len(ds) - 1):
        image, label = ds[index]
        assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32)
        assert ds.samples[index][0].parent.name == classnames[label]


def test_val_images_match_the_captions_split(digits_small_root):
    coco = json.loads((digits_small_root / "annotations" / "captions_val.json").read_text())
    classnames = load_classnames(digits_small_root / "classification" / "classnames.json")
    ds = ImageFolderClassification(digits_small_root / "classification" / "val", classnames)
    expected = sorted((classnames[im["digit"]], im["file_name"]) for im in coco["images"])
    assert sorted((p.parent.name, p.name) for p, _ in ds.samples) == expected


def test_folders_option(tmp_path, digits_small_root):
    src = digits_small_root / "classification" / "val"
    root = tmp_path / "wnids"
    for k, name in enumerate(["zero", "one"]):
        shutil.copytree(src / name, root / f"n{k:08d}")
    explicit = ImageFolderClassification(root, ["zero", "one"], folders=["n00000000", "n00000001"])
    implicit = ImageFolderClassification(root, ["zero", "one"], folders="sorted")
    assert explicit.samples == implicit.samples and set(explicit.targets) == {0, 1}
    with pytest.raises(DataError, match="2 class folders for 3 class names"):
        ImageFolderClassification(root, ["a", "b", "c"], folders="sorted")


def test_missing_class_folder_and_empty_root(tmp_path):
    (tmp_path / "zero").mkdir()
    with pytest.raises(DataError, match=r"one: folder for class 1 \('one'\) not found"):
        ImageFolderClassification(tmp_path, ["zero", "one"])
    with pytest.raises(DataError, match="no images found"):
        ImageFolderClassification(tmp_path, ["zero"])
    with pytest.raises(DataError, match=r"absent: image folder not found"):
        ImageFolderClassification(tmp_path / "absent", ["zero"])


def test_unreadable_image(tmp_path):
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "bad.png").write_bytes(b"garbage")
    ds = ImageFolderClassification(tmp_path, ["zero"])
    with pytest.raises(DataError, match=r"bad\.png: cannot read image"):
        ds[0]


def write(tmp_path, obj, name):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("content,message", [
    ("[1, 2", "not valid JSON"),
    ({"a": 1}, "expected a JSON list of class names"),
    ([], "expected a non-empty JSON list"),
    (["cat", ""], r"class names\[1\] must be a non-empty string"),
    (["cat", 3], r"class names\[1\] must be a non-empty string"),
    (["cat", "cat"], "duplicate class name 'cat'"),
])
def test_bad_classnames(tmp_path, content, message):
    with pytest.raises(DataError, match=rf"classnames\.json: .*{message}"):
        load_classnames(write(tmp_path, content, "classnames.json"))


@pytest.mark.parametrize("content,message", [
    (["a photo of a {c}.", "a photo."], r"templates\[1\] 'a photo\.' must contain \{c\}"),
    (["a {c} and a {d}."], "placeholder other than"),
    ("not json", "not valid JSON"),
])
def test_bad_templates(tmp_path, content, message):
    with pytest.raises(DataError, match=rf"templates\.json: .*{message}"):
        load_templates(write(tmp_path, content, "templates.json"))


def test_clip_benchmark_mapping_form(tmp_path):
    path = write(tmp_path, {"mnist": ["0", "1"], "cifar10": ["airplane"]}, "en_classnames.json")
    assert load_classnames(path, key="mnist") == ["0", "1"]
    with pytest.raises(DataError, match="dataset key is needed"):
        load_classnames(path)
    with pytest.raises(DataError, match="no class names for dataset 'svhn'"):
        load_classnames(path, key="svhn")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.json: file not found"):
        load_templates(tmp_path / "nothere.json")
