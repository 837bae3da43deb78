"""clipprune.io: atomic writes and reproducible safetensors bytes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipprune.io import atomic_path, safetensors_bytes, save_safetensors

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
