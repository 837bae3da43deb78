"""``evaluate.datasets``: params validation, opening each type, and metrics through the evaluate suite."""
from __future__ import annotations

import json

import pytest

from clipprune.data.evalsets import EvalDatasetSpec, open_eval_dataset, parse_eval_datasets
from clipprune.errors import DataError, ParamError
from clipprune.evaluate.suite import dataset_metrics

from .evalset_fixtures import (CLASSNAMES, TEMPLATES, ColorClip, write_coco_karpathy, write_flickr30k_karpathy,
                               write_imagenet_val)


@pytest.fixture
def evalroot(tmp_path):
    """All three sets in CLIP_benchmark's layout under one folder, and their params entries (relative paths)."""
    write_imagenet_val(tmp_path / "imagenet1k")
    write_coco_karpathy(tmp_path / "mscoco_captions")
    write_flickr30k_karpathy(tmp_path / "flickr30k")
    entries = [
        {"name": "imagenet1k", "type": "imagefolder", "root": "imagenet1k/val",
         "classnames": "imagenet1k/en_classnames.json",
         "templates": "imagenet1k/en_zeroshot_classification_templates.json"},
        {"name": "mscoco_karpathy_test", "type": "coco_karpathy", "root": "mscoco_captions/val2014",
         "annotation": "mscoco_captions/coco_test_karpathy.json"},
        {"name": "flickr30k_karpathy_test", "type": "flickr30k_karpathy", "root": "flickr30k",
         "annotation": "flickr30k/flickr30k_test_karpathy.txt"},
    ]
    return tmp_path, entries


def test_parse_resolves_paths_and_defaults(evalroot):
    root, entries = evalroot
    imagenet, coco, flickr = parse_eval_datasets(entries, base=root)
    assert imagenet == EvalDatasetSpec(
        name="imagenet1k", type="imagefolder", root=root / "imagenet1k/val",
        classnames=root / "imagenet1k/en_classnames.json",
        templates=root / "imagenet1k/en_zeroshot_classification_templates.json",
        key="imagenet1k", folders="sorted", max_images=None)
    assert imagenet.task == "zeroshot" and coco.task == flickr.task == "retrieval"
    assert coco.annotation == root / "mscoco_captions/coco_test_karpathy.json" and coco.classnames is None
    assert parse_eval_datasets(None) == parse_eval_datasets([]) == []
    absolute = dict(entries[1], root=str(root / "elsewhere"))
    assert parse_eval_datasets([absolute], base="/ignored")[0].root == root / "elsewhere"


@pytest.mark.parametrize("edit, message", [
    (lambda e: "not a list", r"evaluate\.datasets must be a list"),
    (lambda e: [e[0], 5], r"evaluate\.datasets\[1\] must be a mapping"),
    (lambda e: [{k: v for k, v in e[0].items() if k != "type"}], r"evaluate\.datasets\[0\]\.type is required"),
    (lambda e: [dict(e[0], type="webdataset")], r"\[0\]\.type must be one of imagefolder, coco_karpathy, "
                                                r"flickr30k_karpathy; got 'webdataset'"),
    (lambda e: [{k: v for k, v in e[1].items() if k != "name"}], r"\[0\]\.name is required"),
    (lambda e: [dict(e[1], name="../up")], r"\[0\]\.name must be a plain folder name"),
    (lambda e: [e[1], dict(e[2], name=e[1]["name"])], r"\[1\]\.name 'mscoco_karpathy_test' is used by another"),
    (lambda e: [dict(e[1], annotations="x.json")], r"\[0\]\.annotations is not a field of type coco_karpathy"),
    (lambda e: [dict(e[1], classnames="x.json")], r"\[0\]\.classnames is not a field of type coco_karpathy"),
    (lambda e: [{k: v for k, v in e[2].items() if k != "annotation"}],
     r"\[0\]\.annotation is required for type flickr30k_karpathy"),
    (lambda e: [{k: v for k, v in e[0].items() if k != "templates"}], r"\[0\]\.templates is required"),
    (lambda e: [dict(e[0], root="")], r"\[0\]\.root must be a non-empty path string"),
    (lambda e: [dict(e[0], max_images=0)], r"\[0\]\.max_images must be an integer in \[1, 10000000\] or null, got 0"),
    (lambda e: [dict(e[0], max_images=True)], r"\[0\]\.max_images must be an integer in \[1, 10000000\]"),
    (lambda e: [dict(e[0], folders="wnids")], r"\[0\]\.folders must be one of sorted, classnames; got 'wnids'"),
    (lambda e: [dict(e[0], key=3)], r"\[0\]\.key must be a non-empty string"),
])
def test_bad_params_name_the_entry_and_field(evalroot, edit, message):
    _, entries = evalroot
    with pytest.raises(ParamError, match=message) as info:
        parse_eval_datasets(edit(entries))
    assert "\n" not in str(info.value)


def test_imagenet_folder_labels_follow_sorted_wnids(evalroot):
    root, entries = evalroot
    imagenet = open_eval_dataset(parse_eval_datasets(entries[:1], base=root)[0])
    folder = imagenet.dataset
    assert folder.folders == ["n01440764", "n01443537", "n01484850"]  # written in another order
    assert imagenet.classnames == CLASSNAMES and imagenet.templates == TEMPLATES  # the "imagenet1k" key
    assert folder.targets == [0, 0, 1, 1, 2, 2]
    assert all(path.suffix == ".JPEG" for path, _ in folder.samples)
    assert imagenet.num_captions is None


def test_duplicate_classnames_allowed_only_with_sorted_folders(evalroot):
    """CLIP_benchmark's imagenet1k list names two classes "missile" (and two "sunglasses")."""
    root, entries = evalroot
    (root / "dupes.json").write_text(json.dumps({"imagenet1k": ["missile", "goldfish", "missile"]}))
    entry = dict(entries[0], classnames="dupes.json")
    assert open_eval_dataset(parse_eval_datasets([entry], base=root)[0]).classnames[2] == "missile"
    with pytest.raises(DataError, match=r"dupes\.json: duplicate class name 'missile'"):
        open_eval_dataset(parse_eval_datasets([dict(entry, folders="classnames")], base=root)[0])


@pytest.mark.parametrize("edit, message", [
    (dict(key="imagenet"), r"en_classnames\.json: no class names for dataset 'imagenet'"),
    (dict(root="imagenet1k/train"), r"imagenet1k/train: image folder not found"),
    (dict(classnames="cls.json"), r"imagenet1k/val: 3 class folders for 2 class names"),
])
def test_bad_imagenet_files(evalroot, edit, message):
    root, entries = evalroot
    (root / "cls.json").write_text(json.dumps(["tench", "goldfish"]))  # a plain list: the key is not needed
    with pytest.raises(DataError, match=message):
        open_eval_dataset(parse_eval_datasets([dict(entries[0], **edit)], base=root)[0])


def test_max_images_takes_an_evenly_spaced_subset(evalroot):
    root, entries = evalroot
    imagenet = open_eval_dataset(parse_eval_datasets([dict(entries[0], max_images=3)], base=root)[0])
    assert list(imagenet.dataset.indices) == [0, 2, 4]  # one image of each class
    coco = open_eval_dataset(parse_eval_datasets([dict(entries[1], max_images=2)], base=root)[0])
    assert len(coco.dataset) == 2 and coco.num_captions == 6 + 5
    whole = open_eval_dataset(parse_eval_datasets([dict(entries[1], max_images=10)], base=root)[0])
    assert len(whole.dataset) == 3 and whole.num_captions == 16


def test_dataset_metrics_through_the_suite(evalroot):
    root, entries = evalroot
    opened = [open_eval_dataset(spec) for spec in parse_eval_datasets([entries[0], entries[2]], base=root)]
    metrics = dataset_metrics(ColorClip(), opened, batch_size=4, progress=False)
    assert list(metrics) == ["imagenet1k", "flickr30k_karpathy_test"]
    zeroshot = metrics["imagenet1k"]["zeroshot"]
    assert zeroshot["acc1"] == pytest.approx(5 / 6)  # the red image in the shark folder reads as a tench
    assert zeroshot["acc5"] is None  # 3 classes: top-5 is undefined (CLIP_benchmark reports NaN)
    assert zeroshot["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["imagenet1k"]["num_images"] == 6
    flickr = metrics["flickr30k_karpathy_test"]
    assert flickr["retrieval"]["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert flickr["retrieval"]["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert (flickr["num_images"], flickr["num_captions"]) == (3, 4)
