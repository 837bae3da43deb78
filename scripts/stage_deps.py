"""Exact code dependencies of every DVC stage, computed from the import graph (ast; nothing is imported).

    python scripts/stage_deps.py check          # per stage: code deps missing from / extra in dvc.yaml; exit 1 if any
    python scripts/stage_deps.py write          # rewrite the code deps of every stage in dvc.yaml (= make deps)
    python scripts/stage_deps.py show score     # the files one stage runs, one a line

A stage runs ``python stages/<name>.py``: Python puts ``stages/`` first on ``sys.path`` (so ``import
_common`` is ``stages/_common.py``) and finds ``clipprune`` under ``src/``. The closure of a stage is its
script plus every project module reached from it, transitively:

* ``import a.b.c`` runs ``a/__init__.py``, ``a/b/__init__.py`` and ``a/b/c.py``; ``from a.b import c`` also
  reaches ``a/b/c.py`` when ``c`` is a submodule; relative imports resolve against the importing module;
* imports anywhere in a file count, inside functions too (lazy imports run when the function does);
* ``importlib.import_module("name")`` / ``__import__("name")`` with a literal name count; a computed name
  is an error (this script could not see what it loads: make it an explicit import);
* data files (anything but ``*.py``) inside a package folder the stage imports count too: code may read
  them at run time (none today).

Code deps are the entries of a stage's ``deps:`` under ``stages/`` or ``src/``, one file each (a folder dep
would rerun the stage for edits to modules it never imports). ``write`` replaces exactly those entries and
keeps everything else of dvc.yaml (comments, order, data and artifact deps, ``foreach`` stages). A stage that
reads the ``model`` param loads the model, so it must also depend on ``${model_files}`` (the weights, README
"Running on real CLIP") and read the ``model_files`` param; ``write`` adds both where they are missing.
"""
from __future__ import annotations

import argparse
import ast
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("stages", "src")   # a stage's sys.path: its own folder first, then the installed src/
CODE_PREFIXES = ("stages/", "src/")
MODEL_PARAM = "model"
MODEL_FILES_PARAM = "model_files"
MODEL_FILES_DEP = "${model_files}"
DYNAMIC_IMPORTERS = {"import_module", "__import__"}  # importlib.import_module, builtins.__import__


class DepsError(Exception):
    """The import graph cannot be computed (syntax error, computed import name, unknown stage script)."""


@dataclass(frozen=True)
class Module:
    name: str          # dotted name as Python imports it ("clipprune.data.coco", "_common")
    path: Path         # absolute file
    is_package: bool   # an __init__.py


def index_modules(repo: Path = REPO) -> dict[str, Module]:
    """Every project module importable from a stage, by dotted name."""
    modules: dict[str, Module] = {}
    for root_name in SOURCE_ROOTS:
        root = repo / root_name
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            is_package = path.name == "__init__.py"
            parts = rel.parts[:-1] if is_package else (*rel.parts[:-1], path.stem)
            if not parts:
                continue
            if root_name == "stages" and len(parts) > 1:
                continue  # stages/ is a flat folder of scripts and helpers, not a package
            name = ".".join(parts)
            if name in modules:
                raise DepsError(f"{path.relative_to(repo)} and {modules[name].path.relative_to(repo)} are both "
                                f"importable as {name!r}")
            modules[name] = Module(name, path, is_package)
    return modules


def _package_of(module: Module) -> str:
    return module.name if module.is_package else module.name.rpartition(".")[0]


def _resolve_relative(module: Module, level: int, target: str | None, where: str) -> str:
    package = _package_of(module).split(".") if _package_of(module) else []
    if level - 1 > len(package) or (level - 1 == len(package) and not target):
        raise DepsError(f"{where}: relative import beyond the top-level package")
    base = package[:len(package) - (level - 1)]
    return ".".join([*base, target] if target else base)


_NAMES: dict[tuple, frozenset[str]] = {}  # (module, file size, mtime) -> imported names: each file parsed once


def imported_names(module: Module, repo: Path = REPO) -> frozenset[str]:
    """Dotted names a module imports (project or not), from every import statement and literal importlib call."""
    stat = module.path.stat()
    key = (module, stat.st_size, stat.st_mtime_ns)
    if key not in _NAMES:
        _NAMES[key] = frozenset(_parse_imports(module, repo))
    return _NAMES[key]


def _parse_imports(module: Module, repo: Path) -> set[str]:
    rel = module.path.relative_to(repo)
    try:
        tree = ast.parse(module.path.read_text(), filename=str(rel))
    except SyntaxError as err:
        raise DepsError(f"{rel}:{err.lineno}: {err.msg}") from None
    names: set[str] = set()
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module, where) if node.level else node.module
            names.add(base)
            # `from pkg import name`: name is a submodule or an attribute; keep both guesses, only modules match
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if called not in DYNAMIC_IMPORTERS:
                continue
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                raise DepsError(f"{where}: {called}() with a computed module name; this script cannot tell "
                                f"what it loads, so make it an explicit import")
            target = arg.value
            if target.startswith("."):
                level = len(target) - len(target.lstrip("."))
                target = _resolve_relative(module, level, target[level:] or None, where)
            names.add(target)
    return names


def _with_parents(name: str, modules: dict[str, Module]) -> list[Module]:
    """The project modules that ``import name`` runs: each enclosing package's __init__, then the module."""
    parts = name.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [modules[n] for n in chain if n in modules]


def closure(script: Path, modules: dict[str, Module] | None = None, repo: Path = REPO) -> list[str]:
    """Repo-relative paths of every project file ``python <script>`` runs or reads: the script, then the
    other stages/ helpers, then src/, each sorted."""
    modules = index_modules(repo) if modules is None else modules
    script = (repo / script).resolve() if not script.is_absolute() else script
    entry = next((m for m in modules.values() if m.path == script), None)
    if entry is None:
        raise DepsError(f"{script}: not a module under {', '.join(SOURCE_ROOTS)}/")
    seen: dict[str, Module] = {entry.name: entry}
    todo = [entry]
    while todo:
        module = todo.pop()
        for name in sorted(imported_names(module, repo)):
            for reached in _with_parents(name, modules):
                if reached.name not in seen:
                    seen[reached.name] = reached
                    todo.append(reached)
    files = {m.path for m in seen.values()}
    for package in (m for m in seen.values() if m.is_package):
        files.update(p for p in package.path.parent.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc"))
    first = script.relative_to(repo).as_posix()
    rest = sorted((p.relative_to(repo).as_posix() for p in files if p != script),
                  key=lambda rel: (not rel.startswith("stages/"), rel))
    return [first] + rest


# ---------------------------------------------------------------------------------------------- dvc.yaml

def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, key order and quoting survive
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.preserve_quotes = True
    yaml.width = 110
    return yaml


def stage_bodies(doc) -> dict:
    """Stage name -> the mapping holding its cmd/deps/params (the ``do:`` block of a foreach stage)."""
    return {name: spec["do"] if "foreach" in spec else spec for name, spec in doc["stages"].items()}


def stage_script(name: str, body) -> str:
    cmd = body["cmd"] if isinstance(body["cmd"], str) else " ".join(body["cmd"])
    scripts = [tok for tok in cmd.split() if tok.startswith("stages/") and tok.endswith(".py")]
    if len(scripts) != 1:
        raise DepsError(f"dvc.yaml stage {name}: cmd {cmd!r} must run exactly one stages/<name>.py")
    return scripts[0]


def is_code_dep(dep: str) -> bool:
    return dep.startswith(CODE_PREFIXES)


def _param_names(body) -> list[str]:
    names = []
    for entry in body.get("params") or []:
        names.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(n) for n in names]


@dataclass
class StageDeps:
    name: str
    expected: list[str]                 # the closure: the code deps dvc.yaml must list
    declared: list[str]                 # its code deps now
    loads_model: bool
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


def compare(doc, repo: Path = REPO) -> list[StageDeps]:
    modules = index_modules(repo)
    result = []
    for name, body in stage_bodies(doc).items():
        deps = [str(d) for d in body.get("deps") or []]
        declared = [d for d in deps if is_code_dep(d)]
        entry = StageDeps(name, closure(Path(stage_script(name, body)), modules, repo), declared,
                          MODEL_PARAM in _param_names(body))
        entry.missing = [p for p in entry.expected if p not in declared]
        entry.extra = [d + (" (a folder: list the files it imports instead)" if (repo / d).is_dir() else "")
                       for d in declared if d not in entry.expected]
        if entry.loads_model and MODEL_FILES_DEP not in deps:
            entry.missing.append(f"{MODEL_FILES_DEP} (the stage reads the `model` param)")
        if entry.loads_model and MODEL_FILES_PARAM not in _param_names(body):
            entry.missing.append(f"params: {MODEL_FILES_PARAM}")
        result.append(entry)
    return result


def _rebuilt_deps(old, expected: list[str], loads_model: bool):
    """The new deps sequence: the closure, then the other deps in their order with their comments.

    Comments on removed code deps go with them (they described those entries).
    """
    from ruamel.yaml.comments import CommentedSeq

    comments = old.ca.items if hasattr(old, "ca") else {}
    kept = [(item, comments.get(i)) for i, item in enumerate(old) if not is_code_dep(str(item))]
    if loads_model and MODEL_FILES_DEP not in [str(item) for item, _ in kept]:
        kept.insert(0, (MODEL_FILES_DEP, None))
    new = CommentedSeq(expected + [item for item, _ in kept])
    for offset, (_, comment) in enumerate(kept):
        if comment is not None:
            new.ca.items[len(expected) + offset] = comment
    return new


def write(path: Path = REPO / "dvc.yaml", repo: Path = REPO) -> list[str]:
    """Rewrite the code deps of every stage in ``path``; returns the names of the stages that changed."""
    yaml = _yaml()
    doc = yaml.load(path.read_text())
    changed = []
    for entry, body in zip(compare(doc, repo), stage_bodies(doc).values()):
        if not entry.missing and not entry.extra and entry.declared == entry.expected:
            continue
        changed.append(entry.name)
        body["deps"] = _rebuilt_deps(body.get("deps") or [], entry.expected, entry.loads_model)
        if entry.loads_model and MODEL_FILES_PARAM not in _param_names(body):
            params = body["params"]
            params.insert(params.index(MODEL_PARAM) + 1 if MODEL_PARAM in params else len(params), MODEL_FILES_PARAM)
    if changed:
        buffer = io.StringIO()
        yaml.dump(doc, buffer)
        text = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
        # ruamel leaves a space at the end of a folded line; dropping it must not change any value
        if _plain(_yaml().load(text)) != _plain(doc):
            raise DepsError(f"{path}: stripping trailing spaces would change its content; not written")
        path.write_text(text)
    return changed


def _plain(node):
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def report(entries: list[StageDeps]) -> str:
    lines = []
    for e in entries:
        if e.missing or e.extra:
            lines.append(f"{e.name}: {len(e.missing)} missing, {len(e.extra)} extra")
            lines.extend(f"  missing {p}" for p in e.missing)
            lines.extend(f"  extra   {p}" for p in e.extra)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="list missing and extra code deps per stage; exit 1 if any")
    sub.add_parser("write", help="rewrite the code deps of every stage in dvc.yaml")
    show = sub.add_parser("show", help="the closure of one stage")
    show.add_argument("stage")
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            changed = write()
            print(f"stage_deps: rewrote the deps of {', '.join(changed)}" if changed else
                  "stage_deps: dvc.yaml is up to date")
            return 0
        doc = _yaml().load((REPO / "dvc.yaml").read_text())
        if args.command == "show":
            bodies = stage_bodies(doc)
            if args.stage not in bodies:
                raise DepsError(f"no stage {args.stage!r} in dvc.yaml ({', '.join(bodies)})")
            print("\n".join(closure(Path(stage_script(args.stage, bodies[args.stage])))))
            return 0
        text = report(compare(doc))
        print(text or "stage_deps: every stage's code deps are exact")
        return 1 if text else 0
    except DepsError as err:
        print(f"stage_deps: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
