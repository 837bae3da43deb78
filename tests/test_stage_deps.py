"""Every stage's code deps in dvc.yaml are exactly the files it imports (scripts/stage_deps.py), and DVC sees it.

Fast: the ast closure against dvc.yaml, the closure rules on a small synthetic tree against what Python
really imports there, the real stages' module-level imports against their closure, and `write` restoring a
damaged dvc.yaml. Slow (dvc subprocesses on a scratch copy with the committed dvc.lock): `.pyc` files
written by running Python change no stage, an edit to one module changes exactly the stages whose closure
holds it, new weights behind `model_files` change exactly the stages that load the model, and DVC hashes an
absolute HF-cache snapshot (a folder of symlinks into blobs/) by content.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline_utils import REPO, copy_repo, dvc, env

sys.path.insert(0, str(REPO / "scripts"))
import stage_deps  # noqa: E402

DOC = stage_deps._yaml().load((REPO / "dvc.yaml").read_text())
STAGES = list(stage_deps.stage_bodies(DOC))


# ---------------------------------------------------------------- dvc.yaml against the import graph

@pytest.mark.parametrize("entry", stage_deps.compare(DOC), ids=lambda e: e.name)
def test_dvc_yaml_code_deps_are_the_import_closure(entry):
    assert not entry.missing, (f"dvc.yaml stage {entry.name} misses deps it imports: {', '.join(entry.missing)} "
                               f"(run `make deps`)")
    assert not entry.extra, (f"dvc.yaml stage {entry.name} lists code it does not import: {', '.join(entry.extra)} "
                             f"(run `make deps`)")


def test_check_command_passes_on_the_committed_dvc_yaml(capsys):
    assert stage_deps.main(["check"]) == 0
    assert capsys.readouterr().out.strip() == "stage_deps: every stage's code deps are exact"


def damaged(text: str) -> str:
    """dvc.yaml with one of each kind of mistake `check` must report and `write` must repair."""
    def swap(old: str, new: str, after: str) -> str:
        nonlocal text
        at = text.index(after)
        assert text.index(old, at) > at
        head, tail = text[:at], text[at:]
        text = head + tail.replace(old, new, 1)
        return text

    swap("      - src/clipprune/io.py\n", "", "\n  score:\n")                                    # missing
    swap("      - src/clipprune/search/mac.py\n", "      - src/clipprune/search\n", "\n  search:\n")  # folder
    swap("      - stages/_common.py\n", "      - stages/_common.py\n      - src/clipprune/tuning/lsq.py\n",
         "\n  report:\n")                                                                       # extra file
    swap("      - ${model_files}\n", "", "\n  tune:\n")                                          # model dep
    swap("      - model_files\n", "", "\n  tune:\n")
    swap("        - src/clipprune/sparsity/cap.py\n", "", "\n  sparsify:\n")                     # foreach
    return text


def test_check_reports_each_mistake_by_stage_and_file():
    doc = stage_deps._yaml().load(damaged((REPO / "dvc.yaml").read_text()))
    text = stage_deps.report(stage_deps.compare(doc))
    lines = text.splitlines()
    assert "score: 1 missing, 0 extra" in lines and "  missing src/clipprune/io.py" in lines
    assert "search: 1 missing, 1 extra" in lines and "  missing src/clipprune/search/mac.py" in lines
    assert "  extra   src/clipprune/search (a folder: list the files it imports instead)" in lines
    assert "report: 0 missing, 1 extra" in lines and "  extra   src/clipprune/tuning/lsq.py" in lines
    assert "tune: 2 missing, 0 extra" in lines and "  missing params: model_files" in lines
    assert "sparsify: 1 missing, 0 extra" in lines and "  missing src/clipprune/sparsity/cap.py" in lines
    assert sum(1 for line in lines if not line.startswith(" ")) == 5  # the other stages are fine


def test_write_restores_the_exact_dvc_yaml(tmp_path):
    """Only code deps (and the model-files dep/param) change; comments, order, data deps and foreach stay."""
    original = (REPO / "dvc.yaml").read_text()
    path = tmp_path / "dvc.yaml"
    path.write_text(damaged(original))
    assert stage_deps.write(path, REPO) == ["score", "search", "tune", "report", "sparsify"]
    assert path.read_text() == original
    assert stage_deps.write(path, REPO) == []  # idempotent


# ---------------------------------------------------------------- the closure rules, against Python itself

TREE = {
    "stages/run.py": """
        import importlib
        import json
        import sys

        from _helper import helper                  # a stages/ helper, found first on sys.path
        import pkg.sub.mod                          # runs pkg/__init__, pkg/sub/__init__, pkg/sub/mod

        def lazy():
            from pkg import lazy_mod                # `from package import submodule`, inside a function
            return lazy_mod

        lazy()
        importlib.import_module("pkg.dynamic")      # a literal importlib name
        root = sys.argv[1]
        print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values())
                                if (getattr(m, "__file__", None) or "").startswith(root))))
    """,
    "stages/_helper.py": "import pkg.helper_dep\nhelper = 1\n",
    "stages/other_stage.py": "import pkg.unused\n",
    "src/pkg/__init__.py": "from .rel import thing\n",
    "src/pkg/rel.py": "thing = 1\n",
    "src/pkg/helper_dep.py": "",
    "src/pkg/sub/__init__.py": "",
    "src/pkg/sub/mod.py": "from ..rel import thing\nfrom . import sibling\n",
    "src/pkg/sub/sibling.py": "",
    "src/pkg/lazy_mod.py": "",
    "src/pkg/dynamic.py": "",
    "src/pkg/unused.py": "",
    "src/pkg/defaults.json": "{}",                  # package data: code may read it at run time
    "src/pkg/sub/__pycache__/mod.cpython-311.pyc": "",
    "src/other/__init__.py": "",
}


def write_tree(root: Path, tree: dict[str, str]) -> None:
    for rel, text in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_closure_matches_what_python_imports(tmp_path):
    write_tree(tmp_path, TREE)
    closure = stage_deps.closure(Path("stages/run.py"), repo=tmp_path)
    assert closure[0] == "stages/run.py" and closure[1] == "stages/_helper.py"
    run = subprocess.run([sys.executable, "stages/run.py", str(tmp_path)], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "src")})
    imported = sorted(Path(f).relative_to(tmp_path).as_posix() for f in json.loads(run.stdout))
    assert "stages/run.py" in imported and "src/pkg/dynamic.py" in imported and "src/pkg/lazy_mod.py" in imported
    assert sorted(p for p in closure if p.endswith(".py")) == imported
    assert [p for p in closure if not p.endswith(".py")] == ["src/pkg/defaults.json"]
    assert "src/pkg/unused.py" not in closure and "src/other/__init__.py" not in closure


@pytest.mark.parametrize("code, match", [
    ("import importlib\nname = 'pkg'\nimportlib.import_module(name)\n", "import_module\\(\\) with a computed"),
    ("__import__('pk' + 'g')\n", "__import__\\(\\) with a computed"),
    ("from .... import x\n", "relative import beyond the top-level package"),
])
def test_imports_it_cannot_follow_are_errors(tmp_path, code, match):
    write_tree(tmp_path, {"stages/run.py": code, "src/pkg/__init__.py": ""})
    with pytest.raises(stage_deps.DepsError, match=match):
        stage_deps.closure(Path("stages/run.py"), repo=tmp_path)


PROBE = """
import json, os, runpy, sys
repo, scripts = sys.argv[1], sys.argv[2:]
sys.path[:0] = [os.path.join(repo, "stages"), os.path.join(repo, "src")]
import numpy, torch, PIL.Image, safetensors.torch, open_clip, matplotlib  # shared: each child only adds the project
result = {}
for script in scripts:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        runpy.run_path(os.path.join(repo, script), run_name="stage_deps_probe")  # module level; main() not run
        project = tuple(os.path.join(repo, top) + os.sep for top in ("stages", "src"))  # not .venv/ inside it
        files = sorted(os.path.relpath(m.__file__, repo) for m in list(sys.modules.values())
                       if (getattr(m, "__file__", None) or "").startswith(project))
        os.write(write, json.dumps(files).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result[script] = json.loads(pipe.read() or "null")
    os.waitpid(pid, 0)
print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_what_each_stage_imports_is_in_its_closure():
    """Python's own record (sys.modules after importing the stage script) is a subset of the ast closure."""
    scripts = {name: stage_deps.stage_script(name, body) for name, body in stage_deps.stage_bodies(DOC).items()}
    run = subprocess.run([sys.executable, "-c", PROBE, str(REPO), *scripts.values()], capture_output=True,
                         text=True, check=True, timeout=600)
    imported = json.loads(run.stdout.splitlines()[-1])
    for name, script in scripts.items():
        closure = set(stage_deps.closure(Path(script)))
        assert imported[script], f"{script} imported nothing?"
        outside = sorted(set(imported[script]) - closure - {script})
        assert not outside, f"stage {name} imports {outside}, which the ast closure missed"
        assert {"stages/_common.py", "src/clipprune/__init__.py"} <= set(imported[script])


# ---------------------------------------------------------------- what DVC sees (slow: dvc subprocesses)

def changed_deps(repo: Path) -> dict[str, dict[str, str]]:
    """Stage -> {dep path: change} from `dvc status --json` (outs are absent in a scratch copy: ignored)."""
    out = dvc(repo, "status", "--json").stdout
    status = json.loads(out[out.index("{"):]) if "{" in out else {}
    result = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and "changed deps" in entry:
                result.setdefault(stage.split(":")[-1], {}).update(entry["changed deps"])
    return result


def dvc_names(name: str, repo: Path) -> list[str]:
    """The names `dvc status` uses for a dvc.yaml stage (a foreach stage: one per item)."""
    import yaml

    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][name]
    if "foreach" not in spec:
        return [name]
    assert spec["foreach"] == "${sparsity.targets}", spec["foreach"]
    return [f"{name}@{t}" for t in yaml.safe_load((repo / "params.yaml").read_text())["sparsity"]["targets"]]


def code_changes(changes: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    found = {stage: {p: c for p, c in deps.items() if stage_deps.is_code_dep(p)} for stage, deps in changes.items()}
    return {stage: deps for stage, deps in found.items() if deps}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the repo with the committed dvc.lock and no outputs."""
    return copy_repo(tmp_path_factory.mktemp("stage_deps") / "repo")


def python_env(repo: Path) -> dict:
    e = env()
    e["PYTHONPATH"] = str(repo / "src")
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # the point is to write .pyc files
    return e


@pytest.mark.slow
def test_pyc_files_change_no_stage(scratch):
    assert code_changes(changed_deps(scratch)) == {}, "dvc.lock is behind the code deps: run `dvc repro`"
    subprocess.run([sys.executable, "-c", "import clipprune.models, clipprune.data, clipprune.report"],
                   cwd=scratch, env=python_env(scratch), check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "src", "stages"], cwd=scratch,
                   env=python_env(scratch), check=True)
    pycache = sorted(p.relative_to(scratch).as_posix() for p in scratch.rglob("__pycache__"))
    assert "src/clipprune/models/__pycache__" in pycache and "stages/__pycache__" in pycache
    changes = changed_deps(scratch)
    assert code_changes(changes) == {}
    assert not any("tiny_clip" in path for deps in changes.values() for path in deps)
    pyc = [p.relative_to(scratch).as_posix() for p in (*scratch.glob("src/clipprune/report/__pycache__/plots.*.pyc"),
                                                        *scratch.glob("stages/__pycache__/_common.*.pyc"))]
    assert len(pyc) == 2
    assert sorted(dvc(scratch, "check-ignore", *pyc).stdout.split()) == sorted(pyc)


EDITED = ["src/clipprune/data/coco.py", "src/clipprune/io.py", "stages/_common.py", "src/clipprune/report/plots.py",
          "src/clipprune/search/adaptive.py", "src/clipprune/sparsity/cap.py"]


@pytest.mark.slow
def test_an_edit_changes_exactly_the_stages_that_import_it(scratch):
    bodies = stage_deps.stage_bodies(stage_deps._yaml().load((scratch / "dvc.yaml").read_text()))
    closures = {name: set(stage_deps.closure(Path(stage_deps.stage_script(name, body)), repo=scratch))
                for name, body in bodies.items()}
    for rel in EDITED:
        with open(scratch / rel, "a") as f:
            f.write("# an edit that changes no behaviour\n")
    changes = code_changes(changed_deps(scratch))
    for rel in EDITED:
        expected = sorted(s for name, closure in closures.items() if rel in closure for s in dvc_names(name, scratch))
        got = sorted(stage for stage, deps in changes.items() if deps.get(rel) == "modified")
        assert got == expected, f"{rel}: dvc status reports it changed in {got}, its importers are {expected}"
    assert sorted({p for deps in changes.values() for p in deps}) == sorted(EDITED)
    assert len(changes["report"]) == 3 and "src/clipprune/data/coco.py" not in changes["report"]


@pytest.mark.slow
def test_new_weights_behind_model_files_change_the_stages_that_load_the_model(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    assert not any("tiny_clip" in p for deps in changed_deps(repo).values() for p in deps)
    with open(repo / "data/fixtures/tiny_clip/model.safetensors", "ab") as f:
        f.write(b"\0")
    changes = changed_deps(repo)
    got = sorted(stage for stage, deps in changes.items() if deps.get("data/fixtures/tiny_clip") == "modified")
    loads = [name for name, body in stage_deps.stage_bodies(DOC).items()
             if stage_deps.MODEL_FILES_DEP in [str(d) for d in body["deps"]]]
    expected = sorted(s for name in loads for s in dvc_names(name, repo))
    assert got == expected and "report" not in got and "download" not in got


DVC_YAML = """
stages:
  load:
    cmd: python -c "print('loaded')" > out.txt
    deps:
      - ${model_files}
    params:
      - model_files
    outs:
      - out.txt
"""


def lock_deps(repo: Path) -> list[dict]:
    import yaml

    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["load"]["deps"]


@pytest.mark.slow
def test_dvc_hashes_an_absolute_hf_snapshot_of_symlinks_by_content(tmp_path):
    from models import fake_hub_snapshot

    cache = tmp_path / "hub"
    snapshot = fake_hub_snapshot(cache, "org/clip", {"model.safetensors": b"weights v1", "config.json": b"{}"})
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env())
    dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(f"model_files: {snapshot}\n")
    dvc(repo, "repro")
    dep = lock_deps(repo)[0]
    assert (dep["path"], dep["nfiles"], dep["size"]) == (str(snapshot), 2, len(b"weights v1") + 2)  # the contents
    assert changed_deps(repo) == {}
    blob = (snapshot / "model.safetensors").resolve()
    assert blob.parent.name == "blobs"
    blob.write_bytes(b"weights v2")  # same size: only the content differs
    assert changed_deps(repo) == {"load": {str(snapshot): "modified"}}
    # a new revision is a new path: params and dep both change, so `dvc repro` reruns the stage
    newer = fake_hub_snapshot(cache, "org/clip", {"model.safetensors": b"weights v3", "config.json": b"{}"},
                              revision="b" * 40)
    (repo / "params.yaml").write_text(f"model_files: {newer}\n")
    assert "load" in dvc(repo, "status", "--json").stdout
    assert "Running stage 'load'" in dvc(repo, "repro").stdout
    assert lock_deps(repo)[0]["path"] == str(newer)
