"""Never unpickle: no unsafe loader in the project's code, and every weights/mask path refuses a pickle.

The planted payload is an object whose ``__reduce__`` makes unpickling open (create) a marker file: if any
loader unpickled it, the marker would exist. Each loader must instead fail with a ClipPruneError (or the
loader's own refusal) and leave no marker.
"""
from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from clipprune.errors import ClipPruneError, MaskError, ModelLoadError

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("src", "stages", "scripts", "bench")

# ---------------------------------------------------------------- static check

ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "cPickle.loads", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load", "cloudpickle.loads",
    "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads", "torch.jit.load",
}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


class _LoadFinder(ast.NodeVisitor):
    """Collects unsafe deserialisation calls, following `import x as y` / `from x import f as g` aliases."""

    def __init__(self):
        self.aliases: dict[str, str] = {}
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if node.module:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _qualname(self, func: ast.AST) -> str | None:
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        parts.append(self.aliases.get(func.id, func.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualname(node.func)
        if name is not None:
            if name in ALWAYS_UNSAFE:
                self.found.append((node.lineno, f"{name}() unpickles"))
            elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                self.found.append((node.lineno, "torch.load() without weights_only=True"))
            elif name == "numpy.load":
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    self.found.append((node.lineno, "numpy.load() with allow_pickle"))
        self.generic_visit(node)


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    finder = _LoadFinder()
    finder.visit(ast.parse(source))
    return finder.found


def test_checker_finds_unsafe_loads():
    # the control: the checker must be able to fail
    bad = """
import pickle, numpy as np, torch
from pickle import loads as pl
from torch import load
import pandas as pd
pickle.load(open("f", "rb"))
pl(b"")
torch.load("x.pt")
load("x.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("p")
torch.jit.load("m.pt")
"""
    assert [line for line, _ in unsafe_loads(bad)] == [6, 7, 8, 9, 10, 11, 12]
    good = """
import numpy as np, torch
from safetensors.torch import load_file
torch.load("x.pt", weights_only=True)
np.load("a.npz")
np.load("a.npz", allow_pickle=False)
load_file("m.safetensors")
"""
    assert unsafe_loads(good) == []


def test_no_unsafe_deserialisation_in_project_code():
    files = [p for d in CODE_DIRS if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert any(p.parts[-2] == "stages" for p in files) and len(files) > 10
    problems = [f"{p.relative_to(REPO)}:{line}: {what}" for p in files for line, what in unsafe_loads(p.read_text())]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- planted payloads

class CreatesMarker:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "UNPICKLED"
    yield path
    assert not path.exists(), "a loader unpickled the planted payload"


def payload(kind: str, marker: Path, dest: Path) -> Path:
    """Write a malicious file at ``dest``: a raw pickle, or a torch.save checkpoint (zip or legacy)."""
    obj = {"weight": CreatesMarker(marker)}
    if kind == "pickle":
        dest.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, dest, _use_new_zipfile_serialization=(kind == "torch_zip"))
    return dest


KINDS = ["pickle", "torch_zip", "torch_legacy"]


@pytest.mark.parametrize("kind", KINDS)
def test_payload_is_live_when_unpickled(tmp_path, kind):
    # the control: an unsafe load of the same file does create the marker
    live = tmp_path / "live"
    path = payload(kind, live, tmp_path / "evil.bin")
    loaded = pickle.loads(path.read_bytes()) if kind == "pickle" else torch.load(path, weights_only=False)
    loaded["weight"].close()
    assert live.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_weights_that_are_a_pickle_are_refused(tmp_path, monkeypatch, marker, kind):
    from clipprune.models import load_model

    fixture = tmp_path / "fixtures" / "evil"
    fixture.mkdir(parents=True)
    shutil.copy(REPO / "data/fixtures/tiny_clip/config.json", fixture / "config.json")
    weights = payload(kind, marker, fixture / "model.safetensors")
    monkeypatch.setenv("CLIPPRUNE_FIXTURES", str(tmp_path / "fixtures"))
    with pytest.raises(ModelLoadError, match=f"{weights}: not a readable safetensors file"):
        load_model("fixture:evil")


@pytest.mark.parametrize("kind", KINDS)
def test_mask_file_that_is_a_pickle_is_refused(tmp_path, marker, kind):
    from clipprune.models import load_masks

    path = payload(kind, marker, tmp_path / "tuned.safetensors")
    with pytest.raises(MaskError, match=f"{path}: not a readable safetensors mask file"):
        load_masks(path)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_export_weights_that_are_a_pickle_are_refused(tmp_path, marker, kind):
    from clipprune.models.pruned import export_pruned, load_pruned
    from clipprune.models import load_model

    out = export_pruned(load_model("fixture:tiny_clip"), None, tmp_path / "pruned")
    weights = payload(kind, marker, out / "model.safetensors")
    with pytest.raises(ClipPruneError, match=f"{weights}: not a readable safetensors file"):
        load_pruned(out)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_load_weights_only_refuses_the_payload(tmp_path, marker, kind):
    # the project itself has no torch.load (checked above); this is the behaviour it would rely on
    path = payload(kind, marker, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", ["torch_zip", "pickle"])
def test_open_clip_local_checkpoint_that_is_a_pickle_is_refused(tmp_path, marker, kind):
    # open_clip:<arch>/<local file> is the one project path that reaches torch.load (inside open_clip)
    from clipprune.models import load_model

    path = payload(kind, marker, tmp_path / "evil.pt")
    refused = r"open_clip:ViT-B-32/.*evil\.pt: the checkpoint holds pickled Python objects.*safetensors"
    with pytest.raises(ModelLoadError, match=refused):
        load_model(f"open_clip:ViT-B-32/{path}")


def test_hf_local_dir_with_pickled_weights_is_refused(tmp_path, marker):
    # hf:<local dir> holding pytorch_model.bin instead of safetensors: transformers' weights-only load
    from transformers import CLIPConfig

    from clipprune.models import load_model

    directory = tmp_path / "evil_hf"
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    config.save_pretrained(directory)
    payload("torch_zip", marker, directory / "pytorch_model.bin")
    refused = f"hf:{directory}: the weights file holds pickled Python objects.*safetensors"
    with pytest.raises(ModelLoadError, match=refused):
        load_model(f"hf:{directory}")
    assert json.loads((directory / "config.json").read_text())["model_type"] == "clip"
