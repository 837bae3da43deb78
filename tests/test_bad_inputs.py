"""Bad inputs, stage by stage: every case must end in one error line, exit code 1 and no outputs.

Subprocess cases run ``stages/<stage>.py`` in ONE throwaway copy of the repo (download and calibrate already
run), changing only what the case needs (params.yaml keys, planted files) and restoring it after. Each
checks: exit code 1 (2 would be a traceback), stderr holds exactly one line besides progress-bar redraws,
that line names the parameter or file and what was expected, and the copy's tree is unchanged (no out
written or modified, no `.*.tmp` or other file left anywhere). More values of the same kinds call the stage ``main`` in-process
(fast), and library cases at the end cover mask files, exported models and corrupt safetensors.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from clipprune.errors import ClipPruneError, MaskError, ModelLoadError
from pipeline_utils import DELETE as _DELETE, copy_repo, env, run_script, set_key, stage

RAW = "data/raw/digits"
DIGITS = f"{RAW}/digits"
# tqdm bars always show the elapsed time as "[MM:SS<" or "[MM:SS,"; an error line never does.
_PROGRESS = re.compile(r"\[\d+:\d{2}(?::\d{2})?[<,\]]")


# ---------------------------------------------------------------- helpers

def tree_state(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` (hidden ones included) -> (size, mtime); .git and caches skipped."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__")]
        rel = Path(dirpath).relative_to(root).as_posix()
        state[rel + "/"] = ()
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            state[f"{rel}/{name}"] = (st.st_size, st.st_mtime_ns)
    return state


def tree_diff(before: dict, after: dict) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines that are not progress-bar redraws (bars redraw with '\\r')."""
    return [seg.strip() for seg in re.split(r"[\r\n]", stderr) if seg.strip() and not _PROGRESS.search(seg)]


class BadCase:
    """One bad-input case in the shared copy: edit params, plant files, run a stage, undo everything."""

    def __init__(self, repo: Path, hf_home: Path):
        self.repo = repo
        self.hf_home = hf_home
        self.params_text = (repo / "params.yaml").read_text()
        self.params = yaml.safe_load(self.params_text)
        self._undo: list = []

    def set(self, **edits) -> "BadCase":
        """Set params keys; ``data__name`` stands for ``data.name``."""
        for key, value in edits.items():
            set_key(self.params, key.replace("__", "."), value)
        self.write_params(yaml.safe_dump(self.params, sort_keys=False))
        return self

    def write_params(self, text: str) -> None:
        (self.repo / "params.yaml").write_text(text)

    def plant(self, rel: str, data: bytes | str) -> Path:
        """Write a file (folders created); removed again after the case."""
        path = self.repo / rel
        assert not path.exists(), f"{rel} exists; plant only new files"
        created = [p for p in reversed(path.parents) if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        self._undo.append(lambda: (path.unlink(), [d.rmdir() for d in reversed(created)]))
        return path

    def plant_link(self, rel: str, target: Path) -> None:
        """A symbolic link (possibly dangling) at ``rel``; removed after the case."""
        path = self.repo / rel
        path.symlink_to(target)
        self._undo.append(path.unlink)

    def move_away(self, rel: str) -> None:
        """Take a file out of the repo for the case (put back after)."""
        path = self.repo / rel
        aside = self.repo.parent / f"aside-{path.name}"
        os.replace(path, aside)
        self._undo.append(lambda: os.replace(aside, path))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        (self.repo / "params.yaml").write_text(self.params_text)

    def run(self, stage_name: str, argv: list[str] | None = None) -> str:
        """Run ``stages/<stage_name>.py`` (or the script ``argv``, e.g. a planted wrapper that runs the stage
        under a simulated fault); assert the failure contract and return the error message."""
        before = tree_state(self.repo)
        environment = env()
        environment["HF_HOME"] = str(self.hf_home)  # an empty cache: no weights can be found by accident
        for cache in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
            environment.pop(cache, None)
        proc = run_script(self.repo, argv or [f"stages/{stage_name}.py"], environment=environment, timeout=300)
        after = tree_state(self.repo)
        shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        assert proc.returncode == 1, shown
        assert "Traceback" not in proc.stderr, shown
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{shown}"
        prefix = f"{stage_name}: error: "
        assert lines[0].startswith(prefix), shown
        assert not tree_diff(before, after), f"the failed stage changed the repo: {tree_diff(before, after)[:20]}"
        return lines[0][len(prefix):]


def mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in message: {message}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The throwaway copy, with the download and calibrate stages run once."""
    root = copy_repo(tmp_path_factory.mktemp("bad_inputs") / "repo")
    for name in ("download", "calibrate"):
        proc = stage(root, name)
        assert proc.returncode == 0, proc.stderr[-3000:]
    pristine = tree_state(root)
    yield root
    # every case put the repo back as it found it (content; restored files get new mtimes)
    sizes = {k: v[:1] for k, v in tree_state(root).items()}
    assert sizes == {k: v[:1] for k, v in pristine.items()}


@pytest.fixture(scope="module")
def empty_hf_home(tmp_path_factory):
    """One empty HF cache for every case (one zygote environment: see pipeline_utils.run_script)."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture
def bad(repo, empty_hf_home):
    case = BadCase(repo, empty_hf_home)
    yield case
    case.restore()
    left = [p for p in empty_hf_home.rglob("*") if p.is_file()]
    assert not left, f"a case wrote into the empty HF cache: {left[:5]}"


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def link_member(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def archive_case(bad: BadCase, filename: str, data: bytes, sha256=None) -> str:
    """Point data.archives at a planted archive and run download; returns the message."""
    bad.plant(f"bad/{filename}", data)
    bad.set(data__archives=[{"source": f"bad/{filename}", "sha256": sha256}])
    return bad.run("download")


# ---------------------------------------------------------------- download (subprocess)

def test_download_archive_missing(bad):
    bad.set(data__archives=[{"source": "bad/nowhere.zip", "sha256": None}])
    mentions(bad.run("download"), "data.archives[0]", "archive not found", "bad/nowhere.zip")


def test_download_truncated_zip(bad, repo):
    whole = (repo / "data/fixtures/digits.zip").read_bytes()
    mentions(archive_case(bad, "cut.zip", whole[: len(whole) // 2]), "data.archives[0]", "bad/cut.zip",
             "not a valid zip archive")


def test_download_truncated_tar_gz_leaves_no_partial_extraction(bad):
    # many members, cut after the first ones: they extract before the stream breaks, and must not stay
    data = tar_bytes([(f"d/f{i:03d}.txt", os.urandom(2000)) for i in range(60)], mode="w:gz")
    mentions(archive_case(bad, "cut.tar.gz", data[: len(data) * 2 // 3]), "data.archives[0]", "bad/cut.tar.gz",
             "not a valid tar archive")


def test_download_sha256_mismatch(bad):
    bad.set(data__archives=[{"source": "data/fixtures/digits.zip", "sha256": "0" * 64}])
    mentions(bad.run("download"), "data.archives[0]", "sha256 mismatch", "expected " + "0" * 64)


def test_download_sha256_malformed(bad):
    bad.set(data__archives=[{"source": "data/fixtures/digits.zip", "sha256": "abc123"}])
    mentions(bad.run("download"), "data.archives[0].sha256 must be 64 hex digits or null, got 'abc123'")


def test_download_archives_not_a_list(bad):
    bad.set(data__archives="data/fixtures/digits.zip")
    mentions(bad.run("download"), "data.archives must be a non-empty list", "'data/fixtures/digits.zip'")


def test_download_archive_entry_without_source(bad):
    bad.set(data__archives=[{"sha256": None}])
    mentions(bad.run("download"), "data.archives[0] must be a mapping with a non-empty 'source'")


def test_download_second_archive_missing_keeps_previous_output(bad):
    # the first archive extracts fully before the second fails: data/raw/digits must stay as it was
    bad.set(data__archives=[{"source": "data/fixtures/digits.zip", "sha256": None},
                            {"source": "bad/missing.tar", "sha256": None}])
    mentions(bad.run("download"), "data.archives[1]", "archive not found", "bad/missing.tar")


@pytest.mark.parametrize("kind, why", [("dotdot", "escapes the target directory"), ("absolute", "absolute path")])
def test_download_zip_member_escaping(bad, repo, tmp_path, kind, why):
    member = "digits/../../escape.txt" if kind == "dotdot" else str(tmp_path / "escape.txt")
    message = archive_case(bad, "escape.zip", zip_bytes({"digits/ok.txt": b"ok", member: b"evil"}))
    mentions(message, "data.archives[0]", "bad/escape.zip", "refusing member", why, repr(member))
    assert not (repo / "data/escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def test_download_tar_member_escaping(bad, repo):
    message = archive_case(bad, "escape.tar", tar_bytes([("digits/ok.txt", b"ok"), ("../escape.txt", b"evil")]))
    mentions(message, "data.archives[0]", "bad/escape.tar", "refusing member that escapes", "'../escape.txt'")
    assert not (repo / "data/raw/escape.txt").exists()


@pytest.mark.parametrize("kind, target", [(tarfile.SYMTYPE, "../../../outside"), (tarfile.LNKTYPE, "/etc/passwd")],
                         ids=["symlink", "hardlink"])
def test_download_tar_link_escaping(bad, kind, target):
    # a link then a file written through it is the classic escape; the link alone must be refused
    members = [("digits/ok.txt", b"ok"), link_member("digits/link", target, kind), ("digits/link/x", b"evil")]
    message = archive_case(bad, "links.tar", tar_bytes(members))
    mentions(message, "data.archives[0]", "bad/links.tar", "refusing link member 'digits/link'", repr(target))


def zip_with_flags(members: dict[str, bytes], flagged: str, flags: int) -> bytes:
    """A stored zip whose member ``flagged`` has general-purpose ``flags`` set (local and central headers)."""
    data = bytearray(zip_bytes(members))
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        name_at = 30 if flag_at == 6 else 46
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at:start + name_at + len(flagged)] == flagged.encode():
                data[start + flag_at] |= flags
            start += 4
    return bytes(data)


def deflated_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def special_member(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info


# each: archive file name, its bytes, what the error line names besides the archive
ARCHIVE_CASES = {
    "zip_ratio_bomb": ("bomb.zip", lambda: deflated_zip({"digits/ok.txt": b"ok", "digits/zeros.bin": bytes(20 << 20)}),
                       ["member 'digits/zeros.bin'", "over the limit of 100:1", "MAX_COMPRESSION_RATIO"]),
    "zip_encrypted": ("secret.zip", lambda: zip_with_flags({"digits/ok.txt": b"ok", "digits/s.txt": b"s"},
                                                           "digits/s.txt", 0x1),
                      ["refusing encrypted member 'digits/s.txt'"]),
    "zip_case_clash": ("case.zip", lambda: zip_bytes({"digits/A.txt": b"1", "digits/a.txt": b"2"}),
                       ["members 'digits/A.txt' and 'digits/a.txt' differ only in letter case"]),
    "zip_file_dir_clash": ("clash.zip", lambda: zip_bytes({"digits/x": b"1", "digits/x/y": b"2"}),
                           ["'digits/x' would be both a file and a directory"]),
    "zip_name_too_long": ("long.zip", lambda: zip_bytes({"digits/" + "n" * 300: b"1"}),
                          ["its name part", "is 300 bytes, the filesystem holds at most 255"]),
    "tar_device": ("dev.tar", lambda: tar_bytes([("digits/ok.txt", b"ok"), special_member("digits/null", tarfile.CHRTYPE)]),
                   ["refusing special file member 'digits/null' (character device)"]),
    "tar_duplicate": ("dup.tar", lambda: tar_bytes([("digits/a.txt", b"1"), ("digits/a.txt", b"2")]),
                      ["duplicate member 'digits/a.txt'"]),
    "tar_gz_bomb": ("bomb.tar.gz", lambda: tar_bytes([("digits/zeros.bin", bytes(40 << 20))], mode="w:gz"),
                    ["member 'digits/zeros.bin' (40.0 MiB)", "over the limit of 100:1"]),
    "tar_bad_header": ("hdr.tar", lambda: (lambda d: d[:1536 + 100] + b"garbage!" + d[1536 + 108:])(
        tar_bytes([("digits/a.txt", b"a" * 700), ("digits/b.txt", b"b")])),
        ["not a valid tar archive", "unreadable member header at byte 1536"]),
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_CASES))
def test_download_archive_member_problems(bad, case):
    filename, build, expected = ARCHIVE_CASES[case]
    mentions(archive_case(bad, filename, build()), "data.archives[0]", f"bad/{filename}", *expected)


def test_download_two_archives_providing_the_same_file(bad):
    bad.plant("bad/first.zip", zip_bytes({"digits/readme.txt": b"1"}))
    bad.plant("bad/second.zip", zip_bytes({"digits/readme.txt": b"2"}))
    bad.set(data__archives=[{"source": "bad/first.zip", "sha256": None}, {"source": "bad/second.zip", "sha256": None}])
    mentions(bad.run("download"), "data.archives[1]: bad/second.zip: 'digits/readme.txt' clashes with",
             "from data.archives[0] (bad/first.zip)")


@pytest.mark.parametrize("name", ["a/b", ".."])
def test_download_dataset_name_not_a_plain_folder(bad, name):
    bad.set(data__name=name)
    mentions(bad.run("download"), "data.name must be a plain folder name", repr(name))


# ---------------------------------------------------------------- calibrate (subprocess)

@pytest.mark.parametrize("value, expected", [
    (0, "calibrate.num_samples must be >= 1, got 0"),
    (-5, "calibrate.num_samples must be >= 1, got -5"),
    ("many", "calibrate.num_samples must be an integer, got 'many'"),
    (12.5, "calibrate.num_samples must be an integer, got 12.5"),
])
def test_calibrate_num_samples_invalid(bad, value, expected):
    bad.set(calibrate__num_samples=value)
    mentions(bad.run("calibrate"), expected)


def test_calibrate_num_samples_larger_than_dataset_names_the_maximum(bad, repo):
    captions = json.loads((repo / DIGITS / "annotations/captions_train.json").read_text())
    available = len(captions["annotations"])
    bad.set(calibrate__num_samples=available + 1)
    mentions(bad.run("calibrate"), f"calibrate.num_samples must be <= {available}", f"got {available + 1}",
             "captions_train.json")


def test_calibrate_seed_not_an_int(bad):
    bad.set(seed="zero")
    mentions(bad.run("calibrate"), "seed must be an integer, got 'zero'")


def test_calibrate_captions_json_malformed(bad):
    bad.plant(f"{RAW}/planted/captions.json", '{"images": [1, 2,,]}')
    bad.set(data__layout__train_captions="planted/captions.json")
    mentions(bad.run("calibrate"), "planted/captions.json", "not valid JSON", "line 1")


def test_calibrate_captions_json_missing_keys(bad):
    content = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1}]}
    bad.plant(f"{RAW}/planted/captions.json", json.dumps(content))
    bad.set(data__layout__train_captions="planted/captions.json")
    mentions(bad.run("calibrate"), "planted/captions.json", "annotations[0] is missing key 'caption'")


def test_calibrate_images_folder_missing(bad):
    bad.set(data__layout__train_images="digits/images/nope")
    mentions(bad.run("calibrate"), "digits/images/nope", "images directory not found")


# ---------------------------------------------------------------- evaluate_dense, evaluate (subprocess)
# The dense model is loaded and its data read by evaluate_dense; evaluate reads its output.

def test_evaluate_unknown_model_prefix(bad):
    bad.set(model="torchhub:clip")
    mentions(bad.run("evaluate_dense"), "model name 'torchhub:clip' must start with one of", "fixture:", "hf:")


def test_evaluate_fixture_that_does_not_exist(bad):
    bad.set(model="fixture:no_such_fixture")
    mentions(bad.run("evaluate_dense"), "fixture:no_such_fixture", "not found", "CLIPPRUNE_FIXTURES")


@pytest.mark.parametrize("model, how", [
    ("hf:openai/clip-vit-base-patch32", "pre-download them with `huggingface-cli download"),
    ("open_clip:ViT-B-32/openai", "pre-download them into the HF/open_clip cache"),
])
def test_evaluate_remote_model_not_available_offline_fails_fast(bad, model, how):
    bad.set(model=model)
    start = time.perf_counter()
    message = bad.run("evaluate_dense")  # the environment sets HF_HUB_OFFLINE=1 and an empty HF_HOME
    assert time.perf_counter() - start < 60, "an offline machine must not wait on the network"
    mentions(message, model, how)


def test_evaluate_corrupt_png_in_classification_folder(bad):
    # sorts first in the first class folder, so the first batch reads it
    bad.plant(f"{DIGITS}/classification/val/zero/000000.png", b"\x89PNG\r\n\x1a\n this is not an image")
    mentions(bad.run("evaluate_dense"), "classification/val/zero/000000.png", "cannot read image")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


IMAGE_CASES = {
    "truncated": (lambda png: png[: len(png) // 2], ["cannot read image"]),
    "last_byte_cut": (lambda png: png[:-1], ["cannot read image", "truncated PNG"]),
    "huge_dimensions": (lambda png: png_claiming(100_000, 100_000),
                        ["image too large", "10000000000 pixels", "MAX_IMAGE_PIXELS"]),
    "bomb_warning_band": (lambda png: png_claiming(9000, 9000), ["image too large", "81000000 pixels"]),
    "garbage": (lambda png: os.urandom(len(png)), ["cannot read image"]),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_evaluate_bad_image_in_classification_folder(bad, repo, case):
    make, expected = IMAGE_CASES[case]
    real = sorted((repo / DIGITS / "classification/val/zero").glob("*.png"))[0].read_bytes()
    # sorts first in the first class folder, so the first batch reads it
    bad.plant(f"{DIGITS}/classification/val/zero/000000.png", make(real))
    mentions(bad.run("evaluate_dense"), "classification/val/zero/000000.png", *expected)


def test_evaluate_retrieval_image_missing(bad, repo):
    val = json.loads((repo / DIGITS / "annotations/captions_val.json").read_text())
    first = min(val["images"], key=lambda image: image["id"])
    bad.move_away(f"{DIGITS}/images/val/{first['file_name']}")
    bad.set(data__layout__classification=None)  # straight to retrieval
    mentions(bad.run("evaluate_dense"), f"images/val/{first['file_name']}", "image file not found")


def test_evaluate_classnames_malformed(bad):
    bad.plant(f"{RAW}/planted/classnames.json", '["zero", "one",')
    bad.set(data__layout__classnames="planted/classnames.json")
    mentions(bad.run("evaluate_dense"), "planted/classnames.json", "not valid JSON")


@pytest.mark.parametrize("stage_name", ["evaluate_dense", "evaluate"])
def test_evaluate_batch_size_zero(bad, stage_name):
    bad.set(evaluate__batch_size=0)
    mentions(bad.run(stage_name), "evaluate.batch_size must be >= 1, got 0")


def test_evaluate_without_the_dense_evaluation(bad):
    mentions(bad.run("evaluate"), "artifacts/eval/dense/metrics.json: dense evaluation not found",
             "run the evaluate_dense stage first")


# ---------------------------------------------------------------- params.yaml itself (subprocess)

def test_params_yaml_not_valid_yaml(bad):
    bad.write_params("seed: [0\nmodel: fixture:tiny_clip\n")
    mentions(bad.run("download"), "params.yaml: not valid YAML")


# ---------------------------------------------------------------- more values, in-process (fast)
# The same stage `main` functions, called in this process on the copy: the error type, one line naming
# the key, and an unchanged tree. The subprocess cases above already show how such errors reach the user.

@pytest.fixture
def call_stage(repo, monkeypatch):
    """``call_stage(stage, **edits)`` -> message of the ClipPruneError raised by ``stages/<stage>.py:main``."""
    monkeypatch.chdir(repo)
    monkeypatch.syspath_prepend(str(repo / "stages"))
    pristine = yaml.safe_load((repo / "params.yaml").read_text())

    def call(stage_name: str, **edits) -> str:
        spec = importlib.util.spec_from_file_location(f"_bad_inputs_{stage_name}", repo / "stages" / f"{stage_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        params = copy.deepcopy(pristine)
        for key, value in edits.items():
            set_key(params, key.replace("__", "."), value)
        before = tree_state(repo)
        with pytest.raises(ClipPruneError) as info:
            module.main(params)
        assert not tree_diff(before, tree_state(repo))
        message = str(info.value)
        assert message and "\n" not in message
        return message

    return call


@pytest.mark.parametrize("name", ["ABSOLUTE", "../outside", ".hidden", "digits\n", "a\\b", ""])
def test_dataset_name_variants_are_refused_by_every_stage(call_stage, tmp_path, name):
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    for stage_name in ("download", "calibrate", "evaluate_dense", "evaluate"):
        mentions(call_stage(stage_name, data__name=name), "data.name must be")
    assert not (tmp_path / "absolute").exists()


@pytest.mark.parametrize("archives, expected", [
    ([], "data.archives must be a non-empty list"),
    (None, "data.archives must be a non-empty list"),
    ([{"source": ""}], "data.archives[0] must be a mapping with a non-empty 'source'"),
    (["data/fixtures/digits.zip"], "data.archives[0] must be a mapping"),
    ([{"source": "data/fixtures/digits.zip", "sha256": "z" * 64}], "data.archives[0].sha256 must be 64 hex digits"),
    ([{"source": "data/fixtures/digits.zip", "sha256": 12345}], "data.archives[0].sha256 must be 64 hex digits"),
])
def test_download_archives_variants(call_stage, archives, expected):
    mentions(call_stage("download", data__archives=archives), expected)


@pytest.mark.parametrize("edits, expected", [
    ({"calibrate__num_samples": True}, "calibrate.num_samples must be an integer, got True"),
    ({"calibrate__num_samples": None}, "calibrate.num_samples must be an integer, got None"),
    ({"calibrate__num_samples": _DELETE}, "calibrate.num_samples is required"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"data__layout__train_images": _DELETE}, "data.layout.train_images is required"),
    ({"data__layout__train_captions": "digits/annotations/nope.json"}, "nope.json: annotation file not found"),
])
def test_calibrate_param_variants(call_stage, edits, expected):
    mentions(call_stage("calibrate", **edits), expected)


@pytest.mark.parametrize("content, expected", [
    ({"images": []}, "missing key 'annotations'"),
    ({"images": [{"id": 1}], "annotations": []}, "images[0] is missing key 'file_name'"),
    ({"images": [{"id": "1", "file_name": "a.png"}], "annotations": []}, "images[0].id must be an integer"),
    ({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 2, "caption": "x"}]},
     "annotations[0] refers to unknown image_id 2"),
    ([1, 2, 3], "expected a JSON object with 'images' and 'annotations'"),
])
def test_calibrate_captions_variants(call_stage, bad, content, expected):
    bad.plant(f"{RAW}/planted/captions.json", json.dumps(content))
    mentions(call_stage("calibrate", data__layout__train_captions="planted/captions.json"),
             "planted/captions.json", expected)


@pytest.mark.parametrize("edits, expected", [
    ({"evaluate__batch_size": "big"}, "evaluate.batch_size must be an integer"),
    ({"evaluate__retrieval_split": "test"}, "evaluate.retrieval_split must be one of train, val; got 'test'"),
    ({"evaluate__max_retrieval_images": 0}, "evaluate.max_retrieval_images must be >= 1, got 0"),
    ({"model": 42}, "model must be a non-empty string, got 42"),
    ({"model": "open_clip:ViT-B-32/no_such_tag"}, "'no_such_tag' is neither a pretrained tag of ViT-B-32"),
    ({"model": "open_clip:No-Such-Arch/openai"}, "unknown architecture 'No-Such-Arch'"),
])
def test_evaluate_dense_param_variants(call_stage, edits, expected):
    mentions(call_stage("evaluate_dense", **edits), expected)


@pytest.mark.parametrize("edits, expected", [
    ({"evaluate__batch_size": "big"}, "evaluate.batch_size must be an integer"),
    ({"evaluate__max_retrieval_images": 0}, "evaluate.max_retrieval_images must be >= 1, got 0"),
    ({"evaluate__latency__repeats": 0}, "evaluate.latency.repeats must be >= 1, got 0"),
    ({"evaluate__steps": "yes"}, "evaluate.steps must be true or false, got 'yes'"),
    ({"evaluate__steps": _DELETE}, "evaluate.steps is required"),
    ({"model": 42}, "model must be a non-empty string, got 42"),
])
def test_evaluate_param_variants(call_stage, edits, expected):
    mentions(call_stage("evaluate", **edits), expected)


@pytest.mark.parametrize("rel, content, expected", [
    ("classnames", '{"zero": 0}', "dataset key is needed"),
    ("classnames", '["zero", "zero"]', "duplicate class name 'zero'"),
    ("classnames", '["zero", 1]', "class names[1] must be a non-empty string"),
    ("templates", '["a photo of a digit"]', "must contain {c}"),
    ("templates", '["a photo of {c} {x}"]', "placeholder other than {c}"),
])
def test_evaluate_classification_file_variants(call_stage, bad, rel, content, expected):
    bad.plant(f"{RAW}/planted/{rel}.json", content)
    mentions(call_stage("evaluate_dense", **{f"data__layout__{rel}": f"planted/{rel}.json"}),
             f"planted/{rel}.json", expected)


def test_evaluate_dangling_image_link_in_classification_folder(call_stage, bad, repo):
    bad.plant_link(f"{DIGITS}/classification/val/zero/000000.png", repo / "no_such_image.png")
    mentions(call_stage("evaluate_dense"), "classification/val/zero/000000.png", "image file not found")


def test_evaluate_classification_folder_missing(call_stage):
    mentions(call_stage("evaluate_dense", data__layout__classification="digits/classification/nope"),
             "digits/classification/nope", "image folder not found")


def test_evaluate_pruned_model_with_inconsistent_config(call_stage, inconsistent_export):
    mentions(call_stage("evaluate_dense", model=f"pruned:{inconsistent_export}"),
             str(inconsistent_export / "model.safetensors"), "weights do not match config.json")


@pytest.mark.parametrize("text, expected", [
    ("seed: 0\n\tmodel: x\n", "not valid YAML"),
    ("- seed\n- model\n", "expected a mapping"),
    ("", "expected a mapping"),
    (None, "params file not found"),
])
def test_params_yaml_variants_through_run_stage(repo, tmp_path, monkeypatch, capsys, text, expected):
    monkeypatch.syspath_prepend(str(repo / "stages"))
    from _common import run_stage

    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as info:
        run_stage("calibrate", lambda params: pytest.fail("main must not run"), params_path=str(path))
    assert info.value.code == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"calibrate: error: {path}: {expected}"), lines


# ---------------------------------------------------------------- library level

@pytest.fixture(scope="module")
def tiny_model():
    from clipprune.models import load_model

    return load_model("fixture:tiny_clip")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny fixture pruned (two heads of vision layer 0, half the neurons of layer 1) and exported."""
    from clipprune.models.pruned import export_pruned
    from clipprune.models import full_masks

    masks = full_masks(tiny_model)
    masks["vision.head"][0, :2] = 0.0
    masks["vision.neuron"][1, masks["vision.neuron"].shape[1] // 2:] = 0.0
    return export_pruned(tiny_model, masks, tmp_path_factory.mktemp("export") / "pruned")


def _copy_export(exported: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (dest / name).write_bytes((exported / name).read_bytes())
    return dest


@pytest.fixture(scope="module")
def inconsistent_export(exported, tmp_path_factory):
    """An export whose config says vision layer 1 keeps fewer MLP neurons than its weights hold."""
    dest = _copy_export(exported, tmp_path_factory.mktemp("inconsistent") / "pruned")
    config = json.loads((dest / "config.json").read_text())
    config["towers"]["vision"]["layers"][1]["ffn_dim"] -= 8
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_exported_model_loads_back(exported, tiny_model):
    from clipprune.models.pruned import load_pruned

    model = load_pruned(exported)  # the control: the untouched export loads
    dense_heads = tiny_model.towers["vision"].block_views()[0].num_heads
    assert model.towers["vision"].block_views()[0].num_heads == dense_heads - 2


def test_load_pruned_config_inconsistent_with_weights_names_the_file(inconsistent_export):
    from clipprune.models.pruned import load_pruned

    with pytest.raises(ClipPruneError) as info:
        load_pruned(inconsistent_export)
    message = str(info.value)
    assert "\n" not in message
    mentions(message, str(inconsistent_export / "model.safetensors"), "weights do not match config.json")


def test_load_pruned_config_head_count_inconsistent(exported, tmp_path):
    from clipprune.models.pruned import load_pruned

    dest = _copy_export(exported, tmp_path / "pruned")
    config = json.loads((dest / "config.json").read_text())
    config["towers"]["vision"]["layers"][0]["heads"] += 1  # disagrees with its own head_index
    (dest / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipPruneError, match=re.escape(str(dest / "config.json")) + r".*towers\.vision\.layers\[0\]"):
        load_pruned(dest)


@pytest.mark.parametrize("cut", ["truncated", "garbage", "empty"])
def test_load_pruned_corrupt_safetensors(exported, tmp_path, cut):
    from clipprune.models.pruned import load_pruned

    dest = _copy_export(exported, tmp_path / "pruned")
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[cut])
    with pytest.raises(ClipPruneError) as info:
        load_pruned(dest)
    mentions(str(info.value), str(weights), "not a readable safetensors file")
    assert "\n" not in str(info.value)


def test_fixture_with_corrupt_safetensors(tmp_path, monkeypatch):
    from clipprune.models import load_model

    fixture = tmp_path / "broken"
    fixture.mkdir()
    source = Path(__file__).resolve().parents[1] / "data/fixtures/tiny_clip"
    (fixture / "config.json").write_text((source / "config.json").read_text())
    (fixture / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:100_000])
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    with pytest.raises(ModelLoadError, match=re.escape(str(fixture / "model.safetensors")) + ".*safetensors"):
        load_model("fixture:broken")


def test_mask_file_with_wrong_shape_names_the_key(tiny_model, tmp_path):
    from clipprune.models import full_masks, load_masks, save_masks, validate_masks

    masks = full_masks(tiny_model)
    layers, heads = masks["vision.head"].shape
    masks["vision.head"] = torch.ones(layers, heads + 1)
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    loaded = load_masks(path)
    with pytest.raises(MaskError) as info:
        validate_masks(tiny_model, loaded, str(path))
    mentions(str(info.value), str(path), "vision.head", f"expected {[layers, heads]}")


def test_mask_file_with_unknown_key_names_the_key(tiny_model, tmp_path):
    from clipprune.models import full_masks, validate_masks

    masks = full_masks(tiny_model)
    masks["audio.head"] = masks.pop("text.head")
    with pytest.raises(MaskError, match="unknown mask key 'audio.head'"):
        validate_masks(tiny_model, masks, "masks.safetensors")


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_corrupt_mask_file(tiny_model, tmp_path, cut):
    from clipprune.models import full_masks, load_masks, save_masks

    path = tmp_path / "masks.safetensors"
    save_masks(path, full_masks(tiny_model))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10] if cut == "truncated" else b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}!!")
    with pytest.raises(MaskError) as info:
        load_masks(path)
    mentions(str(info.value), str(path), "not a readable safetensors mask file")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- widths and dtypes read back from disk

def _edited_export(exported: Path, dest: Path, dotted: str, value) -> Path:
    """A copy of the export whose config.json has ``dotted`` (e.g. "base.image_size") set to ``value``."""
    _copy_export(exported, dest)
    config = json.loads((dest / "config.json").read_text())
    set_key(config, dotted, value)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


VISION = "base.model_cfg.vision_cfg"


@pytest.mark.parametrize("dotted, value, expected", [
    (f"{VISION}.patch_size", 0, f"{VISION}.patch_size must be an integer in [1, 8192], got 0"),
    (f"{VISION}.patch_size", -4, f"{VISION}.patch_size must be an integer in [1, 8192], got -4"),
    (f"{VISION}.patch_size", 64, f"{VISION}.patch_size 64 must not exceed image_size 32"),
    (f"{VISION}.head_width", 0, f"{VISION}.head_width must be an integer in [1, 192], got 0"),
    (f"{VISION}.head_width", 5, f"{VISION}.head_width must divide the width 192 evenly, got 5"),
    (f"{VISION}.width", -4, f"{VISION}.width must be an integer in [1, 65536], got -4"),
    (f"{VISION}.width", 2.5, f"{VISION}.width must be an integer in [1, 65536], got 2.5"),
    (f"{VISION}.layers", 0, f"{VISION}.layers must be an integer in [1, 1024], got 0"),
    (f"{VISION}.layers", [1, 1, 1, 1], f"{VISION}: only ViT vision towers"),
    (f"{VISION}.mlp_ratio", -4, f"{VISION}.mlp_ratio must be a number in (0, 64], got -4"),
    (f"{VISION}.mlp_ratio", 1e9, f"{VISION}.mlp_ratio must be a number in (0, 64], got 1000000000.0"),
    (f"{VISION}.image_size", "x", f"{VISION}.image_size must be an integer in [1, 8192], got 'x'"),
    ("base.model_cfg.text_cfg.heads", 0, "base.model_cfg.text_cfg.heads must be an integer in [1, 64], got 0"),
    ("base.model_cfg.text_cfg.layers", 0, "base.model_cfg.text_cfg.layers must be an integer in [1, 1024], got 0"),
    ("base.model_cfg.text_cfg.vocab_size", -1, "base.model_cfg.text_cfg.vocab_size must be an integer in"),
    ("base.model_cfg.text_cfg.context_length", -1, "base.model_cfg.text_cfg.context_length must be an integer"),
    ("base.model_cfg.embed_dim", None, "base.model_cfg.embed_dim must be an integer in [1, 65536], got None"),
    ("base.model_cfg", [1], "base.model_cfg must be a mapping, got list"),
    ("base.image_size", 0, "base.image_size must be an integer in [1, 8192], got 0"),
    ("base.image_std", [0, 0, 0], "base.image_std must be a list of 3 finite positive numbers"),
    ("base.image_mean", [0.5], "base.image_mean must be a list of 3 finite numbers"),
    ("base.tokenizer.context_length", 0, "base.tokenizer.context_length must be an integer in [1, 65536], got 0"),
])
def test_load_pruned_checks_every_width_of_config_json(exported, tmp_path, dotted, value, expected):
    from clipprune.models.pruned import load_pruned

    dest = _edited_export(exported, tmp_path / "pruned", dotted, value)
    with pytest.raises(ClipPruneError) as info:
        load_pruned(dest)
    message = str(info.value)
    assert "\n" not in message
    mentions(message, f"{dest / 'config.json'}: {expected}")


def test_load_pruned_refuses_an_architecture_too_large_to_build(exported, tmp_path):
    from clipprune.models.pruned import load_pruned

    dest = _edited_export(exported, tmp_path / "pruned", VISION, {"width": 65536, "head_width": 64, "layers": 1024,
                                                                  "patch_size": 4, "image_size": 32})
    with pytest.raises(ClipPruneError,
                       match=r"config\.json: base\.model_cfg describes about 5\.28e\+13 parameters, more than"):
        load_pruned(dest)


def test_evaluate_pruned_model_with_a_zero_patch_size(call_stage, exported, tmp_path):
    dest = _edited_export(exported, tmp_path / "pruned", f"{VISION}.patch_size", 0)
    mentions(call_stage("evaluate_dense", model=f"pruned:{dest}"), str(dest / "config.json"),
             f"{VISION}.patch_size must be an integer in [1, 8192], got 0")


@pytest.mark.parametrize("dotted, value, expected", [
    ("model_cfg.vision_cfg.head_width", 0, "model_cfg.vision_cfg.head_width must be an integer in [1, 192], got 0"),
    ("model_cfg.vision_cfg.patch_size", 0, "model_cfg.vision_cfg.patch_size must be an integer"),
    ("model_cfg.text_cfg.context_length", 0, "model_cfg.text_cfg.context_length must be an integer"),
    ("image_std", [0.2, 0.2, 0], "image_std must be a list of 3 finite positive numbers"),
])
def test_fixture_config_widths_are_checked(tmp_path, monkeypatch, dotted, value, expected):
    from clipprune.models import load_model

    source = Path(__file__).resolve().parents[1] / "data/fixtures/tiny_clip"
    fixture = tmp_path / "broken"
    fixture.mkdir()
    config = json.loads((source / "config.json").read_text())
    set_key(config, dotted, value)
    (fixture / "config.json").write_text(json.dumps(config))
    (fixture / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_model("fixture:broken")
    mentions(str(info.value), f"{fixture / 'config.json'}: {expected}")


def _retyped_weights(path: Path, key: str, dtype: torch.dtype) -> None:
    from clipprune.io import read_safetensors, safetensors_bytes

    tensors, metadata = read_safetensors(path)
    tensors[key] = tensors[key].to(dtype)
    path.write_bytes(safetensors_bytes(tensors, metadata))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16])
def test_load_pruned_refuses_weights_of_another_dtype(exported, tmp_path, dtype):
    from clipprune.models.pruned import load_pruned

    dest = _copy_export(exported, tmp_path / "pruned")
    _retyped_weights(dest / "model.safetensors", "visual.proj", dtype)
    with pytest.raises(ClipPruneError) as info:
        load_pruned(dest)
    mentions(str(info.value), str(dest / "model.safetensors"),
             f"tensor visual.proj has dtype {str(dtype).removeprefix('torch.')}, expected float32")


def test_fixture_with_integer_weights(tmp_path, monkeypatch):
    from clipprune.models import load_model

    source = Path(__file__).resolve().parents[1] / "data/fixtures/tiny_clip"
    fixture = tmp_path / "ints"
    fixture.mkdir()
    (fixture / "config.json").write_text((source / "config.json").read_text())
    (fixture / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    _retyped_weights(fixture / "model.safetensors", "visual.proj", torch.int32)
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path))
    with pytest.raises(ModelLoadError, match=re.escape(f"{fixture / 'model.safetensors'}: tensor visual.proj has "
                                                       "dtype int32, expected a floating-point dtype")):
        load_model("fixture:ints")


@pytest.mark.parametrize("damage, expected", [
    ("int64", "tensor classes has dtype int64, expected a floating-point dtype"),
    ("huge_header", "not a readable text embeddings file (Error while deserializing header"),
])
def test_text_embeddings_file_of_another_dtype_or_header(tmp_path, damage, expected):
    from clipprune.errors import DataError
    from clipprune.evaluate.embeddings import FORMAT, load_text_embeddings
    from clipprune.io import save_safetensors

    path = tmp_path / "text_embeddings.safetensors"
    if damage == "int64":
        save_safetensors(path, {"classes": torch.ones(4, 2, dtype=torch.int64)},
                         {"format": FORMAT, "fingerprint": '"x"', "batch_size": "8", "entries": '{"classes": {}}'})
    else:
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(DataError) as info:
        load_text_embeddings(path)
    mentions(str(info.value), str(path), expected)


@pytest.mark.parametrize("damage, expected", [
    ("huge_header", "not a readable sparse_prune output (Error while deserializing header: header too large)"),
    ("values_int64", "tensor 0.5000/layer.__values__ has dtype int64, expected a floating-point dtype"),
    ("targets_not_a_list", "metadata needs 'targets' (a list), 'shapes' and 'meta.state_keys'"),
    ("no_state_keys", "metadata needs 'targets' (a list), 'shapes' and 'meta.state_keys'"),
    ("negative_shape", "sparse tensor layer is malformed (shape [-4, 2] is not a list of non-negative integers)"),
])
def test_sparse_prune_output_is_validated_when_sparsify_reads_it(tmp_path, damage, expected):
    from clipprune.io import save_safetensors
    from clipprune.sparsity.export import compact_tensors, read_target

    weight = torch.tensor([[0.0, 1.5], [2.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    tensors, _ = compact_tensors({"0.5000/layer": weight}, ["0.5000/layer"])
    meta = {"targets": ["0.5000"], "shapes": {"layer": [4, 2]}, "meta": {"state_keys": {"layer": "w"}}}
    if damage == "values_int64":
        tensors["0.5000/layer.__values__"] = tensors["0.5000/layer.__values__"].long()
    elif damage == "targets_not_a_list":
        meta["targets"] = "0.5000"
    elif damage == "no_state_keys":
        meta["meta"] = {}
    elif damage == "negative_shape":
        meta["shapes"]["layer"] = [-4, 2]
    path = tmp_path / "pruned.safetensors"
    save_safetensors(path, tensors, {k: json.dumps(v) for k, v in meta.items()})
    if damage == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(ClipPruneError) as info:
        read_target(path, "0.5000")
    mentions(str(info.value), str(path), expected)


def test_checkpoint_tensor_of_another_dtype_is_refused(tmp_path):
    from clipprune.distill.checkpoint import Checkpoint, CheckpointError, check_against, load_checkpoint, \
        rng_state, save_checkpoint

    path = tmp_path / "last.safetensors"
    save_checkpoint(path, Checkpoint(epoch=1, step=2, model={"w": torch.ones(2, dtype=torch.float64)},
                                     rng=rng_state()), "fp")
    checkpoint = load_checkpoint(path, "fp")
    with pytest.raises(CheckpointError, match=re.escape("model/w has shape [2] (float64), expected [2] (float32)")):
        check_against(path, checkpoint, {"w": torch.ones(2)}, {})
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: corrupt or truncated (Error while deserializing")):
        load_checkpoint(path, "fp")
