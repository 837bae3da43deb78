"""Which local files a model name reads, found without loading a weight (and without importing torch).

``resolve_model_files(name)`` is what ``models.loading.load_model(name)`` reads:

* ``fixture:<name>`` -> ``<fixtures root>/<name>/`` (config.json + model.safetensors);
* ``open_clip:<arch>/<local file>`` -> that file;
* ``open_clip:<arch>/<pretrained tag>`` -> the Hugging Face cache snapshot folder of the tag's ``hf_hub``
  repo (``.../models--<org>--<name>/snapshots/<revision>/``: the path names the cached revision);
* ``hf:<local dir>`` -> that folder; ``hf:<repo id>`` -> its HF cache snapshot folder (revision ``main``);
* ``pruned:<dir>`` -> that folder.

An open_clip architecture whose text config names an ``hf_tokenizer_name`` also reads that repo's snapshot.
``check_model_files(name, model_files)`` is the stages' guard: the ``model_files`` param, a DVC dependency
of every stage that loads the model, must be each resolved path or a folder above it. This module imports
only the standard library at load time, so the stage wrapper can use it without making every stage depend
on the model code.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError, ParamError

PREFIXES = ("fixture", "open_clip", "hf", "pruned")
FIXTURE_HINT = ("build it with the project's fixture script (make fixtures) or point CLIPPRUNE_FIXTURES "
                "at a directory holding <name>/config.json and <name>/model.safetensors")
OPEN_CLIP_USAGE = ("expected open_clip:<arch>/<pretrained tag or local checkpoint file>, "
                   "e.g. open_clip:ViT-B-32/openai")
HF_USAGE = "expected hf:<repo id or local dir>, e.g. hf:openai/clip-vit-base-patch32"
# open_clip 3.3 (pretrained.download_pretrained_from_hf): the default weights name, and the safetensors file
# it tries first for a .bin / .pth name
OPEN_CLIP_HF_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"


def fixtures_root() -> Path:
    """The folder ``fixture:<name>`` names are looked up in: env CLIPPRUNE_FIXTURES (the stages set it to the
    project's data/fixtures). The library assumes no checkout around it, so unset is a ModelLoadError."""
    root = os.environ.get("CLIPPRUNE_FIXTURES")
    if not root:
        raise ModelLoadError("fixture:<name> models are read from the folder in env CLIPPRUNE_FIXTURES, which is "
                             "not set; set it to a directory holding <name>/config.json and "
                             "<name>/model.safetensors (the pipeline's stages set it to data/fixtures)")
    return Path(root)


def split_name(name: str) -> tuple[str, str]:
    """``"hf:openai/x"`` -> ``("hf", "openai/x")``; ModelLoadError listing the prefixes otherwise."""
    prefix, sep, spec = str(name).partition(":")
    if not sep or prefix not in PREFIXES:
        valid = ", ".join(f"{p}:" for p in PREFIXES)
        raise ModelLoadError(f"model name {name!r} must start with one of {valid} "
                             f"(e.g. fixture:tiny_clip, hf:openai/clip-vit-base-patch32)")
    return prefix, spec


def fixture_files(spec: str) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a fixture; ModelLoadError naming the first one missing."""
    directory = fixtures_root() / spec
    paths = directory / "config.json", directory / "model.safetensors"
    for path in paths:
        if not path.is_file():
            raise ModelLoadError(f"fixture:{spec}: {path} not found; {FIXTURE_HINT}")
    return paths


def parse_open_clip(spec: str) -> tuple[str, str, bool]:
    """``"<arch>/<tag or file>"`` -> (arch, tag or file, is a local file), validated against open_clip."""
    import open_clip

    arch, _, pretrained = spec.partition("/")
    if not arch or not pretrained:
        raise ModelLoadError(f"open_clip:{spec}: {OPEN_CLIP_USAGE}")
    if arch not in open_clip.list_models():
        raise ModelLoadError(f"open_clip:{spec}: unknown architecture {arch!r} (see open_clip.list_models()); "
                             f"{OPEN_CLIP_USAGE}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    is_file = pretrained not in tags
    if is_file and not os.path.isfile(pretrained):
        raise ModelLoadError(f"open_clip:{spec}: {pretrained!r} is neither a pretrained tag of {arch} "
                             f"({', '.join(tags) or 'none'}) nor an existing checkpoint file")
    return arch, pretrained, is_file


def hf_cached(repo_id: str, filename: str, name: str) -> Path | None:
    """The file in the HF cache snapshot of ``repo_id`` at revision main, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except HFValidationError as err:
        raise ModelLoadError(f"{name}: {repo_id!r} is neither a local directory nor a valid hub repo id "
                             f"({str(err).splitlines()[0]})") from None
    return Path(found) if isinstance(found, str) else None  # None or "known to be absent"


def _snapshot_of(cached: Path, filename: str) -> Path:
    """snapshots/<revision>/ holding ``cached`` (``filename`` may name a subfolder of the repo)."""
    return cached.parents[len(Path(filename).parts) - 1]


def _open_clip_tag_files(arch: str, tag: str, spec: str) -> Path:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return Path(cfg["file"])
    hint = (f"pre-download them into the HF/open_clip cache (HF_HOME) on a machine with internet, or pass a "
            f"local checkpoint file as open_clip:{arch}/<path>")
    hub = cfg.get("hf_hub", "")
    if not hub:  # a URL-only tag: open_clip keeps it in ~/.cache/clip under the URL's file name
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg.get("url", ""))
        if not path.is_file():
            raise ModelLoadError(f"open_clip:{spec}: the weights are not in {path}; {hint}")
        return path
    repo_id, filename = os.path.split(hub)
    filename = filename or OPEN_CLIP_HF_WEIGHTS
    safe = ([OPEN_CLIP_HF_SAFE_WEIGHTS] if filename == OPEN_CLIP_HF_WEIGHTS else
            [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
    for candidate in (*safe, filename):
        cached = hf_cached(repo_id, candidate, f"open_clip:{spec}")
        if cached is not None:
            return _snapshot_of(cached, candidate)
    raise ModelLoadError(f"open_clip:{spec}: the weights ({repo_id}, {' or '.join((*safe, filename))}) are not "
                         f"in the HF cache; {hint}")


def _open_clip_tokenizer_files(arch: str, spec: str) -> list[Path]:
    """The HF tokenizer an architecture names in its text config (none for OpenAI-style BPE archs)."""
    import open_clip

    repo_id = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if not repo_id:
        return []
    for filename in ("tokenizer.json", "tokenizer_config.json"):
        cached = hf_cached(repo_id, filename, f"open_clip:{spec}")
        if cached is not None:
            return [_snapshot_of(cached, filename)]
    raise ModelLoadError(f"open_clip:{spec}: the tokenizer {repo_id} of {arch} is not in the HF cache; "
                         f"pre-download it with `huggingface-cli download {repo_id}` on a machine with internet")


def hf_directory(spec: str) -> Path:
    """The folder ``hf:<spec>`` reads: the local directory, else the repo's HF cache snapshot."""
    if not spec:
        raise ModelLoadError(f"hf:: {HF_USAGE}")
    if Path(spec).is_dir():
        return Path(spec)
    cached = hf_cached(spec, "config.json", f"hf:{spec}")
    if cached is None:
        raise ModelLoadError(
            f"hf:{spec}: not a local directory and not in the HF cache; pre-download them with "
            f"`huggingface-cli download {spec}` on a machine with internet (HF_HOME cache), or pass a local "
            f"directory saved with save_pretrained as hf:<dir>")
    return _snapshot_of(cached, "config.json")


def resolve_model_files(name: str) -> tuple[Path, ...]:
    """The local files or folders ``load_model(name)`` reads (module docstring); nothing is loaded."""
    prefix, spec = split_name(name)
    if prefix == "fixture":
        return (fixture_files(spec)[0].parent,)
    if prefix == "open_clip":
        arch, pretrained, is_file = parse_open_clip(spec)
        weights = Path(pretrained) if is_file else _open_clip_tag_files(arch, pretrained, spec)
        return (weights, *_open_clip_tokenizer_files(arch, spec))
    if prefix == "hf":
        return (hf_directory(spec),)
    config = Path(spec) / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"pruned:{spec}: {config} not found (expected a directory written by export_pruned)")
    return (Path(spec),)


def covers(declared: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True if ``declared`` is ``path`` or a folder above it (compared as written, then with links resolved)."""
    for norm in (os.path.abspath, os.path.realpath):
        outer, inner = Path(norm(declared)), Path(norm(path))
        if inner == outer or outer in inner.parents:
            return True
    return False


def _shown(path: Path) -> str:
    """Relative to the working directory when inside it (as params.yaml would say), else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(absolute)


def check_model_files(name: str, model_files: str) -> tuple[Path, ...]:
    """ParamError unless ``model_files`` covers every file model ``name`` reads; returns those files."""
    needed = resolve_model_files(name)
    if all(covers(model_files, path) for path in needed):
        return needed
    expected = _shown(needed[0]) if len(needed) == 1 else \
        "a folder holding " + " and ".join(_shown(p) for p in needed)
    raise ParamError(f"model_files must be {expected} (the files model {name} reads), got {model_files}")
