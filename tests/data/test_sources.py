"""download_dataset: several archives into one folder, all or nothing, one size budget, no silent overwrite."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from clipprune.data import archive as archive_module
from clipprune.data.sources import download_dataset
from clipprune.errors import DataError


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def entries(*paths: Path) -> list[dict]:
    return [{"source": str(p), "sha256": None} for p in paths]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_left(target: Path) -> None:
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == []  # no staging, parts or .tmp folders


def test_archives_merge_into_shared_folders(tmp_path):
    # the COCO layout: images and annotations in separate archives, one of them shares a folder
    a = make_zip(tmp_path / "train.zip", {"train/1.jpg": b"1", "annotations/captions_train.json": b"{}"})
    b = make_zip(tmp_path / "val.zip", {"val/2.jpg": b"2", "annotations/captions_val.json": b"[]"})
    target = tmp_path / "raw" / "ds"
    download_dataset(entries(a, b), target, progress=False)
    assert tree(target) == {"train/1.jpg": b"1", "val/2.jpg": b"2", "annotations/captions_train.json": b"{}",
                            "annotations/captions_val.json": b"[]"}
    assert [p.name for p in target.parent.iterdir()] == ["ds"]


@pytest.mark.parametrize("second, why", [
    ({"annotations/captions.json": b"other"}, "are both there as a file"),
    ({"annotations/captions.json/x": b"other"}, "a file in one and a folder in the other"),
    ({"Annotations/captions.json": b"other"}, "differ only in letter case"),
    ({"annotations/Captions.json": b"other"}, "differ only in letter case"),
])
def test_a_path_two_archives_provide_is_an_error_naming_both(tmp_path, second, why):
    a = make_zip(tmp_path / "one.zip", {"annotations/captions.json": b"first", "one/x": b"1"})
    b = make_zip(tmp_path / "two.zip", {"two/y": b"2", **second})
    target = tmp_path / "raw" / "ds"
    with pytest.raises(DataError) as err:
        download_dataset(entries(a, b), target, progress=False)
    message = str(err.value)
    assert message.startswith(f"data.archives[1]: {b}: ") and f"from data.archives[0] ({a})" in message, message
    assert why in message and "\n" not in message
    assert_nothing_left(target)


def test_archives_share_one_size_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_EXTRACTED_BYTES", 15_000)
    a = make_zip(tmp_path / "a.zip", {"a/x.bin": os.urandom(8000)})
    b = make_zip(tmp_path / "b.zip", {"b/y.bin": os.urandom(8000)})
    download_dataset(entries(a), tmp_path / "raw" / "only_a", progress=False)  # each fits on its own
    target = tmp_path / "raw" / "ds"
    with pytest.raises(DataError, match=r"^data\.archives\[1\]: .*b\.zip: its members .* would bring the extracted "
                                        r"data to 15\.6 KiB, over the limit of 14\.6 KiB \(MAX_EXTRACTED_BYTES"):
        download_dataset(entries(a, b), target, progress=False)
    assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["only_a"]


def test_failure_in_a_later_archive_keeps_the_previous_output(tmp_path):
    a = make_zip(tmp_path / "a.zip", {"a/x": b"x"})
    target = tmp_path / "raw" / "ds"
    download_dataset(entries(a), target, progress=False)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match=r"data\.archives\[1\]: .*bad\.zip"):
        download_dataset(entries(a, bad), target, progress=False)
    assert tree(target) == {"a/x": b"x"}
    assert [p.name for p in target.parent.iterdir()] == ["ds"]
