"""clipprune.io: atomic writes and reproducible safetensors bytes."""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipprune import io as cio
from clipprune.errors import ClipPruneError, DataError, MaskError, OutputError
from clipprune.io import (FLOATING, atomic_dir, atomic_path, commit_together, read_safetensors, safetensors_bytes,
                          save_safetensors, staged, write_json)

WRITE_SCRIPT = """
import sys, torch
from clipprune.io import save_safetensors
tensors = {"b.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "a.count": torch.tensor([1, 2], dtype=torch.int64),
           "m.half": torch.ones(5, dtype=torch.float16), "flag": torch.tensor([True, False])}
save_safetensors(sys.argv[1], tensors, {"zeta": "1", "alpha": "2", "format": "x", "seed": "0", "towers": "vision"})
"""


def test_round_trip_through_the_safetensors_library(tmp_path):
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).half(), "i": torch.arange(4), "b": torch.tensor([True]),
               "bf": torch.randn(2, 2).bfloat16(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    save_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v", "a": "{\"x\": 1}"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"k": "v", "a": "{\"x\": 1}"}


def test_non_contiguous_tensors_are_stored_by_value(tmp_path):
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    save_safetensors(tmp_path / "t.safetensors", {"t": base.t(), "s": base[:, 1:3]})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["s"], base[:, 1:3])


def test_bytes_do_not_depend_on_insertion_order():
    a = {"x": torch.ones(2), "y": torch.zeros(3, dtype=torch.int64)}
    b = {"y": torch.zeros(3, dtype=torch.int64), "x": torch.ones(2)}
    assert safetensors_bytes(a, {"p": "1", "q": "2"}) == safetensors_bytes(b, {"q": "2", "p": "1"})


def test_bytes_are_identical_across_processes(tmp_path):
    # safetensors.torch.save_file orders metadata by a per-process hash; ours must not depend on the process
    digests = set()
    for run, hash_seed in enumerate(("1", "2", "3", "4")):
        out = tmp_path / f"{run}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE_SCRIPT, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        digests.add(out.read_bytes())
    assert len(digests) == 1


def test_offsets_are_aligned_to_dtype():
    import json
    import struct
    raw = safetensors_bytes({"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(3, dtype=torch.float64),
                             "c": torch.ones(1, dtype=torch.float16)})
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8:8 + length])
    sizes = {"U8": 1, "F64": 8, "F16": 2}
    for name, entry in header.items():
        assert entry["data_offsets"][0] % sizes[entry["dtype"]] == 0, name


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        safetensors_bytes({"x": [1, 2]})
    with pytest.raises(TypeError, match="complex"):
        safetensors_bytes({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError):
        save_safetensors(tmp_path / "bad.safetensors", {"x": "no"})
    assert not list(tmp_path.iterdir()), "a failed write leaves nothing behind"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
        from clipprune.io import atomic_dir
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- read_safetensors: every read is validated

def _header(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


UNREADABLE = {
    "empty": b"",
    "shorter than the length field": b"\x10\x00\x00",
    "header length of 2**62": struct.pack("<Q", 2**62) + b"{}",
    "header length beyond the file": struct.pack("<Q", 4096) + b"{}",
    "header not JSON": struct.pack("<Q", 8) + b"{oops}!!",
    "header a JSON list": _header([1, 2]),
    "unknown dtype name": _header({"a": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative shape": _header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets past the data": _header({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 4),
    "shape and offsets disagree": _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "metadata value not a string": _header({"__metadata__": {"k": 1}}),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_read_safetensors_refuses_structural_damage_in_one_line(tmp_path, case):
    path = tmp_path / "x.safetensors"
    path.write_bytes(UNREADABLE[case])
    with pytest.raises(MaskError) as info:
        read_safetensors(path, error=MaskError, unreadable="not a readable mask file", suffix="; rerun tune")
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable mask file (") and message.endswith("; rerun tune")
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("what", ["directory", "missing"])
def test_read_safetensors_of_no_regular_file(tmp_path, what):
    path = tmp_path / "x.safetensors"
    if what == "directory":
        path.mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        read_safetensors(path)


@pytest.mark.parametrize("dtype, allowed, ok", [
    (torch.int64, torch.float32, False),
    (torch.float16, torch.float32, False),
    (torch.bool, torch.float32, False),
    (torch.float32, torch.float32, True),
    (torch.bfloat16, FLOATING, True),
    (torch.int32, FLOATING, False),
    (torch.uint8, (torch.uint8, torch.int8), True),
])
def test_read_safetensors_checks_dtypes(tmp_path, dtype, allowed, ok):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"scores": torch.ones(2, 3).to(dtype)})
    if ok:
        assert read_safetensors(path, dtypes={"score*": allowed})[0]["scores"].dtype == dtype
        return
    with pytest.raises(DataError) as info:
        read_safetensors(path, dtypes={"score*": allowed})
    assert f"tensor scores has dtype {str(dtype).removeprefix('torch.')}, expected" in str(info.value)


def test_read_safetensors_exact_names_before_patterns_and_unknown_names_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"rng": torch.zeros(4, dtype=torch.uint8), "w": torch.ones(2)})
    tensors, _ = read_safetensors(path, dtypes={"rng": torch.uint8, "*": torch.float32})
    assert set(tensors) == {"rng", "w"}
    with pytest.raises(DataError, match="unexpected tensor 'w'"):
        read_safetensors(path, dtypes={"rng": torch.uint8})
    assert set(read_safetensors(path, keys=lambda k: k == "w")[0]) == {"w"}


# ---------------------------------------------------------------- outputs: all or none, one line on I/O errors

def _enospc(names):
    """A Path.write_bytes / write_text that fails like a full disk for temporaries of the given targets."""
    real_bytes, real_text = Path.write_bytes, Path.write_text

    def full(path):
        if any(part.startswith(f".{name}.") for part in path.parts for name in names):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write_bytes(self, data):
        full(self)
        return real_bytes(self, data)

    def write_text(self, data, *args, **kwargs):
        full(self)
        return real_text(self, data, *args, **kwargs)
    return write_bytes, write_text


def _three_outputs(root: Path) -> None:
    write_json(root / "a.json", {"new": 1})
    save_safetensors(root / "b.safetensors", {"x": torch.ones(1)})
    with atomic_dir(root / "c") as tmp:
        (tmp / "inside.txt").write_text("new")


def _old_outputs(root: Path) -> dict:
    (root / "a.json").write_text("old a")
    (root / "b.safetensors").write_text("old b")
    (root / "c").mkdir()
    (root / "c" / "inside.txt").write_text("old c")
    return _snapshot(root)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_commit_together_writes_all(tmp_path):
    _old_outputs(tmp_path)
    with commit_together():
        _three_outputs(tmp_path)
        assert (tmp_path / "a.json").read_text() == "old a"  # nothing is in place before the block ends
        assert json.loads(staged(tmp_path / "a.json").read_text()) == {"new": 1}
    assert json.loads((tmp_path / "a.json").read_text()) == {"new": 1}
    assert (tmp_path / "c" / "inside.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.safetensors", "c"]


@pytest.mark.parametrize("fault", ["exception in the block", "full disk on the last write",
                                   "second rename fails", "interrupted"])
def test_commit_together_writes_none_on_failure(tmp_path, monkeypatch, fault):
    before = _old_outputs(tmp_path)
    if fault == "full disk on the last write":
        write_bytes, write_text = _enospc(["c"])
        monkeypatch.setattr(Path, "write_text", write_text)
    elif fault == "second rename fails":
        real, failed = os.replace, []

        def replace(src, dst):  # the rename of b's new file fails once (the rollback's renames succeed)
            if Path(src).name.startswith(".b.safetensors.") and Path(dst).name == "b.safetensors" and not failed:
                failed.append(src)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(src, dst)
        monkeypatch.setattr(cio.os, "replace", replace)
    expected = {"exception in the block": RuntimeError, "interrupted": KeyboardInterrupt}.get(fault, OutputError)
    with pytest.raises(expected) as info:
        with commit_together():
            _three_outputs(tmp_path)
            if fault == "exception in the block":
                raise RuntimeError("boom")
            if fault == "interrupted":
                raise KeyboardInterrupt
    if expected is OutputError:
        assert str(info.value).startswith(f"{tmp_path}: cannot write ") and "\n" not in str(info.value)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # old outputs intact, no temporary left


def test_nested_commit_together_joins_the_outer_block(tmp_path):
    with pytest.raises(RuntimeError):
        with commit_together():
            with commit_together():
                write_json(tmp_path / "inner.json", {})
            assert not (tmp_path / "inner.json").exists()
            raise RuntimeError("outer fails")
    assert not list(tmp_path.iterdir())


def test_a_target_written_twice_in_a_block_keeps_the_last(tmp_path):
    with commit_together():
        write_json(tmp_path / "a.json", {"v": 1})
        write_json(tmp_path / "a.json", {"v": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("fault", ["full disk", "read-only directory", "parent is a file", "disk quota"])
@pytest.mark.parametrize("writer", ["atomic_path", "atomic_dir", "save_safetensors"])
def test_unwritable_output_is_one_line_naming_the_directory(tmp_path, monkeypatch, fault, writer):
    out_dir = tmp_path / "artifacts"
    out_dir.mkdir()
    (out_dir / "out").write_text("previous") if writer != "atomic_dir" else None
    target = out_dir / "out"
    if fault == "parent is a file":
        (tmp_path / "blocker").write_text("a file")
        target = tmp_path / "blocker" / "sub" / "out"
    elif fault == "read-only directory":  # root ignores modes: refuse creating files in the directory instead
        def mkstemp(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / "x.tmp"))
        monkeypatch.setattr(cio.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(cio.tempfile, "mkdtemp", mkstemp)
    else:
        code = errno.ENOSPC if fault == "full disk" else errno.EDQUOT
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError) as info:
        if writer == "save_safetensors":
            save_safetensors(target, {"x": torch.ones(1)})
        else:
            with (atomic_path if writer == "atomic_path" else atomic_dir)(target) as tmp:
                (tmp if writer == "atomic_path" else tmp / "f").write_bytes(b"data")
    message = str(info.value)
    assert message.startswith(f"{target.parent}: cannot write out there (") and "\n" not in message
    assert isinstance(info.value, ClipPruneError)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_errors_of_reading_inputs_inside_a_write_are_not_output_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text((tmp_path / "no_such_input.json").read_text())
    elsewhere = tmp_path / "inputs"
    elsewhere.mkdir()
    with pytest.raises(PermissionError):  # EACCES on a file outside the output's directory: not about the output
        with atomic_path(tmp_path / "out" / "x.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(elsewhere / "secret"))
    assert not (tmp_path / "out.json").exists()


def test_files_written_into_a_staged_folder_are_there_before_the_commit(tmp_path):
    """Inside a group, an atomic_dir's own files go straight into its temporary (they are private to it)."""
    with commit_together():
        with atomic_dir(tmp_path / "model") as tmp:
            save_safetensors(tmp / "model.safetensors", {"w": torch.ones(2)})
            write_json(tmp / "config.json", {"k": 1})
        assert not (tmp_path / "model").exists()
        assert sorted(p.name for p in staged(tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
