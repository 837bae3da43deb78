"""params.yaml parsed once, at the stage edge, into typed and validated sections.

Every section is a pydantic model that forbids unknown keys; every value goes through one of the checks
below, which say what the value must be. A bad file gives ONE line naming the key::

    search.constraint must be in (0, 1], got 1.5
    search.constrant: unknown key; did you mean `constraint`?
    serach: unknown top-level key; did you mean `search`?
    evaluate.latency.batch_size must be <= 65536, got 1000000000

Rules (README "Parameters"): unknown keys are errors in every section and at the top level (with the closest
known key); numbers that size memory, files or processes have an upper bound, stated in the message;
``data.layout.*`` paths stay inside ``data/raw/<data.name>/`` and ``evaluate.datasets`` paths inside
``data/eval/`` (the folders the stages depend on); method options are checked against the method's own
table; values that contradict each other are refused. Names that come from a registry (score criteria and
losses, searches, sparsity methods) are checked against the names the caller passes in ``choices`` (the
stage that runs the registry), otherwise only as non-empty strings: this module imports no library code,
so every stage can parse the whole file cheaply.

:func:`parse_params` checks every section present in the file, not only the ones a stage reads, so a typo
or a bad value anywhere fails the first stage that runs, before any work. The library then takes the typed
values and does not check them again (only data-derived state: file contents, tensor shapes, sizes).
"""
import difflib
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, ValidationInfo, model_validator

from .errors import ParamError

# ------------------------------------------------------------------------------------------ choices and bounds
TOWER_CHOICES = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}
GRANULARITIES = ("batch", "sample")
METRICS = ("mac", "params")  # what flops.py counts
SEARCH_METRICS = METRICS + ("latency",)  # search.metric: latency budgets a measured lookup table (search/latency.py)
LATENCY_METHODS = ("mac",)  # the searches that can budget latency
LATENCY_POINTS_RANGE = (2, 4096)  # search.latency_points: MLP widths timed for the latency table
ALIGN_MAX = 4096               # search.align: kept neurons rounded to multiples of this many
ONNX_OPSET_RANGE = (14, 20)    # onnx.opset: what torch's TorchScript exporter writes and onnxruntime runs
SPLITS = ("train", "val")
SEARCH_LOSSES = ("entropy", "entropy_image_text", "contrastive")  # search.options.loss (adaptive)
DISTILL_MODES = ("distill", "retrain")
DISTILL_LOSSES = ("mse", "kl")
KL_PAIRS = ("image_text", "image_image")
DEVICES = ("auto", "cpu", "cuda")
MASK_TYPES = ("unstructured", "block4", "N:M")
FISHER_DTYPES = ("float32", "float64")
PRECISIONS = ("float32", "bfloat16", "float16")  # score/tune.precision: autocast dtype of the forward passes
REFERENCE_BATCH = 256  # distill lr scaling: base_lr is the rate for a global batch of 256

# Upper bounds: what could exhaust memory or overflow. Generous for real runs (COCO has 591,753 train
# captions; CAP's ViT recipes use 4096 gradients and Fisher blocks of 192), far below what breaks.
SEED_MAX = 2**63 - 1           # torch.manual_seed and numpy seeds take any int64
BATCH_MAX = 65536              # any batch size: activations scale with it
SAMPLES_MAX = 10_000_000       # image / caption counts drawn from a split
NUM_GRADS_MAX = 1 << 20        # sparsity.num_grads: per-sample gradients in the Fisher
FISHER_BLOCK_MAX = 4096        # sparsity.fisher_block_size: inverses hold weights x B floats
CHUNK_LAYERS_MAX = 100_000
RECOMPUTATIONS_MAX = 100       # sparsity.num_recomputations: each step reruns the whole method
DPI_RANGE = (30, 600)          # report.dpi: 600 dpi is print quality; 10^5 would need terabytes of pixels
NPROC_MAX = 256                # <stage>.nproc: one process (and model copy) each
EPOCHS_MAX = 100_000
LATENCY_WARMUP_MAX = 10_000
LATENCY_REPEATS_MAX = 100_000
HALVINGS_RANGE = (1, 30)       # search.options.halvings: 2^30 neurons is beyond any block

RAW_DIR = "data/raw"           # data.layout paths are inside data/raw/<data.name>/
EVAL_DIR = "data/eval"         # evaluate.datasets paths are inside data/eval/ (a dep of the evaluate stages)


class _Invalid(ValueError):
    """What a value must be, as ``"must be ..., got ..."``; the key is prefixed from where it failed."""


# ------------------------------------------------------------------------------------------ value checks
# Each factory returns a check ``value -> typed value`` raising _Invalid; _typed() makes it a field type.

def _got(value: Any, with_type: bool = False) -> str:
    return f"{value!r} ({type(value).__name__})" if with_type else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(low: int | None = None, high: int | None = None, *, nullable: bool = False) -> Callable:
    def check(value):
        if value is None and nullable:
            return None
        if not _is_int(value):
            raise _Invalid(f"must be an integer{' or null' if nullable else ''}, got {_got(value, True)}")
        if low is not None and value < low:
            raise _Invalid(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise _Invalid(f"must be <= {high}, got {value}")
        return int(value)
    return check


def _interval(low, high, low_open, high_open) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, nullable: bool = False) -> Callable:
    """A finite number; with both bounds the messages name the interval, with one the inequality."""
    two_sided = low is not None and high is not None

    def check(value):
        if value is None and nullable:
            return None
        if two_sided:
            interval = _interval(low, high, low_open, high_open)
            if not _is_real(value):
                raise _Invalid(f"must be a number in {interval}, got {_got(value, True)}")
            inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not inside:  # NaN is never inside
                raise _Invalid(f"must be in {interval}, got {value!r}")
            return float(value)
        if not _is_real(value) or not math.isfinite(value):
            raise _Invalid(f"must be a finite number{' or null' if nullable else ''}, "
                           f"got {_got(value, not _is_real(value))}")
        if low is not None and (value <= low if low_open else value < low):
            raise _Invalid(f"must be {'>' if low_open else '>='} {low:g}, got {value!r}")
        if high is not None and (value >= high if high_open else value > high):
            raise _Invalid(f"must be {'<' if high_open else '<='} {high:g}, got {value!r}")
        return float(value)
    return check


def _bool(value):
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {value!r}")
    return value


def _str(value):
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a non-empty string, got {_got(value, True)}")
    return value


def _choice(*choices: str) -> Callable:
    def check(value):
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    return check


def _towers(value) -> tuple[str, ...]:
    if not isinstance(value, str) or value not in TOWER_CHOICES:
        raise _Invalid(f"must be one of {', '.join(TOWER_CHOICES)}; got {value!r}")
    return TOWER_CHOICES[value]


def parse_towers(value, key: str = "towers") -> tuple[str, ...]:
    """``"vision"`` | ``"text"`` | ``"both"`` -> tuple of tower names (the library's argument for a towers key)."""
    return check_value(key, value, _towers)


def check_choice(value, choices: Iterable[str], key: str) -> str:
    """``value`` if it is one of ``choices``; ParamError ``<key> must be one of ...`` otherwise."""
    return check_value(key, value, _choice(*choices))


def check_value(key: str, value, check: Callable):
    """``check(value)`` with its complaint turned into the one-line ParamError naming ``key``."""
    try:
        return check(value)
    except _Invalid as err:
        raise ParamError(f"{key} {err}") from None


def _mapping(what: str) -> Callable:
    def check(value):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _Invalid(f"must be a mapping of {what}, got {value!r}")
        return dict(value)
    return check


def _registry(key: str, nullable: bool = False) -> Callable:
    """A registered name: checked against ``choices[key]`` when the caller passed them (see module doc)."""
    def check(value, info: ValidationInfo):
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            raise _Invalid(f"must be a non-empty string, got {_got(value, True)}")
        names = ((info.context or {}).get("choices") or {}).get(key)
        if names is not None and value not in names:
            raise _Invalid(f"must be one of {', '.join(sorted(names))}; got {value!r}")
        return value
    return check


def _relative_path(inside: str, nullable: bool = False) -> Callable:
    """A relative path without '..' (it must not leave ``inside``: files there are what DVC tracks)."""
    def check(value):
        if value is None and nullable:
            return None
        problem = _path_problem(value)
        if problem:
            raise _Invalid(f"must be a relative path inside {inside} ({problem}), got {value!r}")
        return value
    return check


def _path_problem(value) -> str | None:
    """Why ``value`` is not a plain relative path (None if it is one)."""
    if not isinstance(value, str) or not value.strip():
        return "a non-empty string"
    if "\\" in value:
        return "'/' as the separator, no '\\'"
    if value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", value) or os.path.isabs(value):
        return "not absolute"
    if ".." in PurePosixPath(value).parts:
        return "no '..'"
    return None


def _typed(annotation, check: Callable):
    return Annotated[annotation, PlainValidator(check)]


Seed = _typed(int, _int(0, SEED_MAX))
BatchSize = _typed(int, _int(1, BATCH_MAX))
NProc = _typed(int, _int(1, NPROC_MAX))
Samples = _typed(int, _int(1, SAMPLES_MAX))
OptionalSamples = _typed(int | None, _int(1, SAMPLES_MAX, nullable=True))
Bool = _typed(bool, _bool)
Text = _typed(str, _str)
Towers = _typed(tuple[str, ...], _towers)
NonNegative = _typed(float, _float(0.0))
Positive = _typed(float, _float(0.0, low_open=True))
Fraction = _typed(float, _float(0.0, 1.0, low_open=True))  # (0, 1]
Options = _typed(dict, _mapping("option names to values"))
LayoutPath = _typed(str, _relative_path(f"{RAW_DIR}/<data.name>/"))
OptionalLayoutPath = _typed(str | None, _relative_path(f"{RAW_DIR}/<data.name>/", nullable=True))


def _choice_type(*choices: str):
    return _typed(str, _choice(*choices))


def _registry_type(key: str):
    return _typed(str, _registry(key))


# ------------------------------------------------------------------------------------------ data
# A dataset name becomes a folder under data/raw/: no separators, no '.'/'..', no hidden names.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_RULE = "a plain folder name (letters, digits, '.', '_', '-'; no '/', '\\' or '..', not starting with '.')"


def check_dataset_name(name, key: str = "data.name") -> str:
    """``name`` if it is a plain folder name (e.g. ``digits``, ``coco2017``); ParamError otherwise."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise ParamError(f"{key} must be {_NAME_RULE}, got {name!r}")
    return name


def parse_archives(archives, key: str = "data.archives") -> list[dict]:
    """The ``data.archives`` list: entries with a ``source`` string and a sha256 (64 hex digits) or null."""
    if not isinstance(archives, list) or not archives:
        raise ParamError(f"{key} must be a non-empty list of {{source, sha256}} entries, got {archives!r}")
    parsed = []
    for i, entry in enumerate(archives):
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or not entry["source"]:
            raise ParamError(f"{key}[{i}] must be a mapping with a non-empty 'source', got {entry!r}")
        unknown = sorted(set(map(str, entry)) - {"source", "sha256"})
        if unknown:
            raise ParamError(_unknown_key_message(f"{key}[{i}].{unknown[0]}", unknown[0], ["source", "sha256"]))
        sha = entry.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                                or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ParamError(f"{key}[{i}].sha256 must be 64 hex digits or null, got {sha!r}")
        parsed.append({"source": entry["source"], "sha256": sha.lower() if sha else None})
    return parsed


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Layout(_Section):
    """Where the splits are inside ``data/raw/<data.name>/``; ``classification: null`` skips zero-shot."""

    train_images: LayoutPath
    train_captions: LayoutPath
    val_images: LayoutPath
    val_captions: LayoutPath
    classification: OptionalLayoutPath = None
    classnames: OptionalLayoutPath = None
    templates: OptionalLayoutPath = None

    @model_validator(mode="after")
    def _classification_files(self):
        if self.classification is not None:
            for key in ("classnames", "templates"):
                if getattr(self, key) is None:
                    raise ParamError(f"data.layout.{key} is required in params.yaml but missing "
                                     f"(data.layout.classification is set)")
        return self


class DataSection(_Section):
    name: _typed(str, lambda value: check_dataset_name(value))
    archives: _typed(list, lambda value: parse_archives(value))
    layout: Layout

    @property
    def root(self) -> Path:
        """``data/raw/<name>``: the folder the download stage extracts into."""
        return Path(RAW_DIR) / self.name

    def path(self, key: str) -> Path:
        """The ``data.layout.<key>`` path under :attr:`root`."""
        return self.root / getattr(self.layout, key)


class CalibrateSection(_Section):
    num_samples: Samples


# ------------------------------------------------------------------------------------------ method options
# Options of the built-in criteria, losses and searches (tests/test_config.py checks these tables against
# the registries' own option lists). Methods registered elsewhere get their options unchecked here; the
# registry still rejects unknown names.
_INV_TEMPERATURE = _float(0.0, low_open=True)
_PATH_OPTION = _str  # score.options.classnames / templates: checked against data.name in Params
LOSS_OPTIONS: dict[str, dict[str, Callable]] = {
    "contrastive": {},
    "entropy": {"inv_temperature": _INV_TEMPERATURE},
    "entropy_image_text": {"inv_temperature": _INV_TEMPERATURE},
    "max_logit": {"texts_per_class": _int(1, SAMPLES_MAX)},
}
CRITERION_OPTIONS: dict[str, dict[str, Callable]] = {
    "fisher": {"keep_grads": _bool},            # + the options of score.loss
    "abs_gradient": {"keep_grads": _bool},      # + the options of score.loss
    "magnitude": {"norm": _choice("l2", "l1")},
    "label_free": {"text_set": _choice("batch", "prompts"), "classnames": _PATH_OPTION,
                   "templates": _PATH_OPTION, "keep_grads": _bool},
    "taylor_entropy": {"inv_temperature": _INV_TEMPERATURE, "keep_grads": _bool},
}
CRITERIA_WITH_LOSS_OPTIONS = ("fisher", "abs_gradient")
_NORMALIZE = {"normalize": _choice("none", "layer")}
SEARCH_OPTIONS: dict[str, dict[str, Callable]] = {
    "mac": _NORMALIZE, "uniform": _NORMALIZE, "param_sum": _NORMALIZE,
    "threshold": {"normalize": _choice("mean", "max", "sum", "none")},
    "adaptive": {"halvings": _int(*HALVINGS_RANGE), "loss": _choice(*SEARCH_LOSSES),
                 "inv_temperature": _INV_TEMPERATURE, "batch_size": _int(2, BATCH_MAX)},
}


def _check_options(key: str, options: dict, table: dict[str, Callable], owner: str,
                   section_keys: Iterable[str] = ()) -> dict:
    """``options`` checked against ``table`` (option -> check); ParamError naming ``key.<option>``."""
    unknown = sorted(set(map(str, options)) - set(table))
    if unknown:
        name = unknown[0]
        if name in section_keys:  # e.g. search.options.loss_inc_thresh
            section = key.rsplit(".", 1)[0]
            raise ParamError(f"{key}.{name} is not an option: set {section}.{name}")
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ParamError(f"{key}: unknown option(s) {', '.join(unknown)} for {owner}; "
                         f"known: {', '.join(table) or 'none'}{hint}")
    checked = {}
    for name, value in options.items():
        try:
            checked[name] = table[name](value)
        except _Invalid as err:
            raise ParamError(f"{key}.{name} {err}") from None
    return checked


class ScoreSection(_Section):
    criterion: _registry_type("score.criterion")
    loss: _registry_type("score.loss")
    granularity: _choice_type(*GRANULARITIES)
    towers: Towers
    batch_size: BatchSize
    options: Options = {}
    nproc: NProc = 1                # data-parallel processes under torchrun (batch i on rank i mod nproc)
    device: _choice_type(*DEVICES) = "cpu"
    precision: _choice_type(*PRECISIONS) = "float32"
    checkpointing: Bool = False     # recompute each block in the backward (memory for large models)

    @model_validator(mode="after")
    def _options(self):
        table = CRITERION_OPTIONS.get(self.criterion)
        if table is None:
            return self
        owner = f"criterion {self.criterion!r}"
        if self.criterion in CRITERIA_WITH_LOSS_OPTIONS and self.loss in LOSS_OPTIONS:
            table = {**table, **LOSS_OPTIONS[self.loss]}
            owner += f" with loss {self.loss!r}"
        options = _check_options("score.options", self.options, table, owner)
        if self.criterion == "label_free":
            _check_label_free(options, self)
        return self.model_copy(update={"options": options})  # the checked (typed) values


def _check_label_free(options: dict, score: "ScoreSection") -> None:
    prompts = options.get("text_set", "batch") == "prompts"
    files = [k for k in ("classnames", "templates") if k in options]
    if not prompts and files:
        raise ParamError("score.options.classnames / templates are only used with score.options.text_set: prompts")
    if prompts:
        for key in ("classnames", "templates"):
            if key not in options:
                raise ParamError(f"score.options.{key} is required with score.options.text_set: prompts "
                                 f"(the path of a JSON file)")
        if score.granularity == "sample" and "text" in score.towers:
            raise ParamError("score.options.text_set=prompts with score.granularity=sample can score only the "
                             "vision tower (per-sample text masks cannot be shared by the prompts); use "
                             "score.towers: vision")


class SearchSection(_Section):
    method: _registry_type("search.method")
    metric: _choice_type(*SEARCH_METRICS)
    constraint: Fraction
    loss_inc_thresh: NonNegative  # adaptive: largest accepted rise of the held-out loss per block
    holdout_samples: _typed(int, _int(2, SAMPLES_MAX))  # adaptive
    align: _typed(int, _int(1, ALIGN_MAX)) = 1  # kept neurons per layer rounded to multiples of align
    latency_points: _typed(int, _int(*LATENCY_POINTS_RANGE)) = 16  # metric latency: MLP widths timed
    options: Options = {}

    @model_validator(mode="after")
    def _latency_method(self):
        if self.metric == "latency" and self.method not in LATENCY_METHODS:
            raise ParamError(f"search.method must be one of {', '.join(LATENCY_METHODS)} with search.metric "
                             f"latency, got {self.method!r}")
        if self.align > 1 and self.method == "adaptive":
            raise ParamError(f"search.align must be 1 with search.method adaptive (its widths follow "
                             f"search.loss_inc_thresh, there is no budget to round within), got {self.align}")
        return self

    @model_validator(mode="after")
    def _options(self):
        table = SEARCH_OPTIONS.get(self.method)
        if table is not None:
            options = _check_options("search.options", self.options, table, f"method {self.method!r}",
                                     section_keys=type(self).model_fields)
            return self.model_copy(update={"options": options})
        return self


class TuneSection(_Section):
    rearrange: Bool
    lsq: Bool
    damp: NonNegative
    max_scale: Positive
    batch_size: BatchSize
    nproc: NProc = 1                # data-parallel processes under torchrun (LSQ statistics all-reduced)
    device: _choice_type(*DEVICES) = "cpu"
    precision: _choice_type(*PRECISIONS) = "float32"  # autocast of the forward passes; LSQ sums stay float32/64


# ------------------------------------------------------------------------------------------ evaluate
CLASSIFICATION_TYPES = ("imagefolder",)
RETRIEVAL_TYPES = ("coco_karpathy", "flickr30k_karpathy")
DATASET_TYPES = CLASSIFICATION_TYPES + RETRIEVAL_TYPES
_REQUIRED = {"imagefolder": ("root", "classnames", "templates"),
             "coco_karpathy": ("root", "annotation"),
             "flickr30k_karpathy": ("root", "annotation")}
_OPTIONAL = {"imagefolder": ("key", "folders", "max_images"),
             "coco_karpathy": ("max_images",),
             "flickr30k_karpathy": ("max_images",)}
_PATH_FIELDS = ("root", "annotation", "classnames", "templates")
_FOLDER_MODES = ("sorted", "classnames")


@dataclass(frozen=True)
class EvalDatasetSpec:
    """One validated entry of ``evaluate.datasets`` (paths not yet checked on disk)."""

    name: str
    type: str
    root: Path
    annotation: Path | None = None
    classnames: Path | None = None
    templates: Path | None = None
    key: str | None = None
    folders: str = "sorted"
    max_images: int | None = None

    @property
    def task(self) -> str:
        """``zeroshot`` or ``retrieval``."""
        return "zeroshot" if self.type in CLASSIFICATION_TYPES else "retrieval"


def _spec_path(entry: dict, field: str, where: str, base: Path) -> Path:
    value = entry[field]
    if not isinstance(value, str) or not value.strip():
        raise ParamError(f"{where}.{field} must be a non-empty path string, got {value!r}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def parse_eval_datasets(value, key: str = "evaluate.datasets", base: str | os.PathLike = ".") -> list[EvalDatasetSpec]:
    """A list of dataset entries (null or [] for none) as specs; relative paths are joined to ``base``.

    The library form (any path); ``evaluate.datasets`` in params.yaml must also keep its paths inside
    ``data/eval/`` (checked by :class:`EvaluateSection`).
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError(f"{key} must be a list of datasets (each with name, type, root, ...), got {value!r}")
    base = Path(base)
    specs: list[EvalDatasetSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ParamError(f"{where} must be a mapping with name, type and root, got {entry!r}")
        if "type" not in entry:
            raise ParamError(f"{where}.type is required (one of {', '.join(DATASET_TYPES)})")
        kind = entry["type"]
        if kind not in DATASET_TYPES:
            raise ParamError(f"{where}.type must be one of {', '.join(DATASET_TYPES)}; got {kind!r}")
        if "name" not in entry:
            raise ParamError(f"{where}.name is required (the key of its metrics)")
        name = check_dataset_name(entry["name"], f"{where}.name")
        if name in names:
            raise ParamError(f"{where}.name {name!r} is used by another entry of {key}")
        names.add(name)
        allowed = ("name", "type", *_REQUIRED[kind], *_OPTIONAL[kind])
        unknown = sorted(set(map(str, entry)) - set(allowed))
        if unknown:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"fields: {', '.join(sorted(allowed))}"
            raise ParamError(f"{where}.{unknown[0]} is not a field of type {kind} ({hint})")
        for field in _REQUIRED[kind]:
            if field not in entry:
                raise ParamError(f"{where}.{field} is required for type {kind}")
        max_images = entry.get("max_images")
        if max_images is not None and (not _is_int(max_images) or not 1 <= max_images <= SAMPLES_MAX):
            raise ParamError(f"{where}.max_images must be an integer in [1, {SAMPLES_MAX}] or null, "
                             f"got {max_images!r}")
        fields = {"root": _spec_path(entry, "root", where, base), "max_images": max_images}
        if kind in CLASSIFICATION_TYPES:
            dataset_key = entry.get("key", name)
            if not isinstance(dataset_key, str) or not dataset_key:
                raise ParamError(f"{where}.key must be a non-empty string, got {dataset_key!r}")
            folders = entry.get("folders", "sorted")
            if folders not in _FOLDER_MODES:
                raise ParamError(f"{where}.folders must be one of {', '.join(_FOLDER_MODES)}; got {folders!r}")
            fields.update(classnames=_spec_path(entry, "classnames", where, base),
                          templates=_spec_path(entry, "templates", where, base), key=dataset_key, folders=folders)
        else:
            fields.update(annotation=_spec_path(entry, "annotation", where, base))
        specs.append(EvalDatasetSpec(name=name, type=kind, **fields))
    return specs


def _eval_datasets(value) -> tuple[EvalDatasetSpec, ...]:
    specs = tuple(parse_eval_datasets(value))
    for i, entry in enumerate(value or []):
        for field in _PATH_FIELDS:
            if field in entry:
                problem = _path_problem(entry[field])
                parts = PurePosixPath(entry[field]).parts
                if problem or parts[:2] != tuple(EVAL_DIR.split("/")):
                    raise ParamError(f"evaluate.datasets[{i}].{field} must be a relative path inside {EVAL_DIR}/ "
                                     f"({problem or 'the folder the evaluate stages depend on'}), "
                                     f"got {entry[field]!r}")
    return specs


class LatencySection(_Section):
    batch_size: BatchSize
    warmup: _typed(int, _int(0, LATENCY_WARMUP_MAX))
    repeats: _typed(int, _int(1, LATENCY_REPEATS_MAX))


class EvaluateSection(_Section):
    batch_size: BatchSize
    steps: Bool
    retrieval_split: _choice_type(*SPLITS)
    max_retrieval_images: OptionalSamples = None
    latency: LatencySection
    datasets: _typed(tuple, _eval_datasets) = ()
    nproc: NProc = 1                # data-parallel processes under torchrun (images and texts by whole batches)


class OnnxSection(_Section):
    """The onnx_export stage: the opset written and the tolerance of the ONNX Runtime check."""

    opset: _typed(int, _int(*ONNX_OPSET_RANGE))
    atol: NonNegative
    rtol: NonNegative


class ReportSection(_Section):
    dpi: _typed(int, _int(*DPI_RANGE)) = 100


# ------------------------------------------------------------------------------------------ distill
@dataclass(frozen=True)
class RetrainRow:
    """One row of the LFPR schedule: at a kept-parameter share >= ``keep``, use ``data`` of the retraining
    images and train the top ``blocks`` blocks of each trained tower (the masks always train)."""

    keep: float
    data: float
    blocks: int


DEFAULT_RETRAIN_SCHEDULE = (
    RetrainRow(0.2, 1.0, 3), RetrainRow(0.3, 0.86, 2), RetrainRow(0.4, 0.73, 2), RetrainRow(0.5, 0.6, 1),
    RetrainRow(0.6, 0.1, 0),
)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Peak learning rate for a global batch: ``base_lr × global_batch / 256`` (linear scaling rule)."""
    return base_lr * global_batch / REFERENCE_BATCH


def parse_schedule(raw: Any, key: str = "distill.retrain.schedule") -> tuple[RetrainRow, ...]:
    """A list of ``{keep, data, blocks}`` rows with strictly increasing ``keep``; ParamError naming ``key``."""
    if not isinstance(raw, list) or not raw:
        raise ParamError(f"{key} must be a non-empty list of {{keep, data, blocks}} rows, got {raw!r}")
    rows: list[RetrainRow] = []
    for i, row in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(row, dict) or set(row) != {"keep", "data", "blocks"}:
            raise ParamError(f"{where} must be a mapping with exactly keep, data and blocks, got {row!r}")
        fields = {}
        for field, check in (("keep", _float(0.0, 1.0, low_open=True)), ("data", _float(0.0, 1.0, low_open=True)),
                             ("blocks", _int(0, CHUNK_LAYERS_MAX))):
            try:
                fields[field] = check(row[field])
            except _Invalid as err:
                raise ParamError(f"{where}.{field} {err}") from None
        if rows and fields["keep"] <= rows[-1].keep:
            raise ParamError(f"{where}.keep must be greater than the previous row's ({rows[-1].keep}), "
                             f"got {fields['keep']}")
        rows.append(RetrainRow(**fields))
    return tuple(rows)


class RetrainSection(_Section):
    mask_lr_scale: Positive = 10.0  # mask scales (about 1) learn at this multiple of the weights' lr
    schedule: _typed(tuple, lambda value: parse_schedule(value)) = None  # None: absent (required by mode retrain)


class DistillSection(_Section):
    enabled: Bool
    mode: _choice_type(*DISTILL_MODES)
    loss: _choice_type(*DISTILL_LOSSES)
    kl_pairs: _choice_type(*KL_PAIRS) = "image_text"
    logit_scale: _typed(float | None, _float(0.0, low_open=True, nullable=True)) = None
    towers: Towers
    num_samples: OptionalSamples = None
    epochs: _typed(int, _int(1, EPOCHS_MAX))
    batch_size: BatchSize
    base_lr: Positive
    min_lr: NonNegative = 0.0
    warmup_steps: _typed(int, _int(0))  # checked against the run's optimizer steps when they are known
    weight_decay: NonNegative
    nproc: NProc
    device: _choice_type(*DEVICES) = "auto"
    retrain: RetrainSection = RetrainSection()

    @model_validator(mode="after")
    def _consistent(self):
        if self.batch_size % self.nproc:
            raise ParamError(f"distill.batch_size must be divisible by distill.nproc ({self.nproc}) so every "
                             f"process gets an equal share of the global batch, got {self.batch_size}")
        peak = scaled_lr(self.base_lr, self.batch_size)
        if self.min_lr > peak:
            raise ParamError(f"distill.min_lr must not exceed the peak lr base_lr*batch_size/256 = {peak:g}, "
                             f"got {self.min_lr}")
        if self.mode == "retrain" and self.retrain.schedule is None:
            raise ParamError("distill.retrain.schedule is required in params.yaml but missing (distill.mode: retrain)")
        return self

    @property
    def schedule(self) -> tuple[RetrainRow, ...]:
        """The LFPR schedule (the default rows when none is given)."""
        return self.retrain.schedule or DEFAULT_RETRAIN_SCHEDULE


def check_warmup(warmup_steps: int, total_steps: int, steps_per_epoch: int, epochs: int) -> None:
    """ParamError when warm-up would take the whole run: the lr would never finish rising nor decay.

    Called once the run's optimizer steps are known (they depend on the size of the train split).
    """
    if warmup_steps > 0 and warmup_steps >= total_steps:
        raise ParamError(f"distill.warmup_steps must be < the {total_steps} optimizer steps of this run "
                         f"(distill.epochs {epochs} x {steps_per_epoch} steps per epoch), got {warmup_steps}: "
                         f"the learning rate would never reach its peak and decay; lower warmup_steps or "
                         f"train longer")


# ------------------------------------------------------------------------------------------ sparsity
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class MaskType:
    """A parsed ``sparsity.mask_type``.

    ``kind``: "unstructured" | "block4" | "nm"; ``group``: weights pruned together (1, or 4 for block4);
    ``n``/``m``: for N:M, keep ``n`` in every ``m`` consecutive weights along the input dimension.
    """

    kind: str
    group: int = 1
    n: int = 0
    m: int = 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def alignment(self) -> int:
        """Weights along the input dimension that a mask unit or N:M group spans."""
        return self.m if self.kind == "nm" else self.group

    @property
    def sparsity(self) -> float | None:
        """The sparsity the mask type fixes by itself (N:M), else None (set by the target)."""
        return (self.m - self.n) / self.m if self.kind == "nm" else None


def parse_mask_type(value, key: str = "sparsity.mask_type") -> MaskType:
    """``"unstructured"``, ``"block4"`` or ``"N:M"`` with 0 < N < M (e.g. ``"2:4"``)."""
    if value == "unstructured":
        return MaskType("unstructured")
    if value == "block4":
        return MaskType("block4", group=4)
    match = _NM.match(value) if isinstance(value, str) else None
    if match:
        n, m = int(match[1]), int(match[2])
        if 0 < n < m <= FISHER_BLOCK_MAX:
            return MaskType("nm", n=n, m=m)
        raise ParamError(f"{key} N:M needs 0 < N < M <= {FISHER_BLOCK_MAX}, got {value!r}")
    hint = ""
    if _is_int(value) and value >= 60:
        # YAML 1.1 (PyYAML, DVC's -S) reads an unquoted 2:4 as the base-60 number 2*60+4
        n_m = f"{value // 60}:{value % 60}"
        hint = f" (an unquoted {n_m} in YAML is the number {value}: write \"{n_m}\")"
    raise ParamError(f"{key} must be unstructured, block4 or N:M (e.g. '2:4'), got {value!r}{hint}")


def check_target(value, key: str = "sparsity.targets") -> float:
    """A sparsity target: a number strictly between 0 and 1 (the fraction of weights set to zero)."""
    if not _is_real(value) or not math.isfinite(value) or not 0 < value < 1:
        raise ParamError(f"{key} must be numbers in (0, 1) (fractions of zero weights), got {value!r}")
    return float(value)


def check_targets(values, key: str = "sparsity.targets") -> tuple[float, ...]:
    """A non-empty list of distinct targets in (0, 1), sorted ascending."""
    if _is_real(values):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ParamError(f"{key} must be a non-empty list of numbers in (0, 1), got {values!r}")
    targets = [check_target(v, key) for v in values]
    if len(set(targets)) != len(targets):
        raise ParamError(f"{key} must not repeat a value, got {values!r}")
    return tuple(sorted(targets))


def _mask_type(value, key: str = "sparsity.mask_type"):
    parse_mask_type(value, key)
    return value


def _sparsity_int(low: int, high: int, nullable: bool = False) -> Callable:
    check = _int(low, high, nullable=nullable)

    def wrapped(value):
        try:
            return check(value)
        except _Invalid:  # sparsity's wording: one message for type and range
            raise _Invalid(f"must be an integer in [{low}, {high}]{' or null' if nullable else ''}, "
                           f"got {value!r}") from None
    return wrapped


def _chunk_layers(value):
    """``auto`` (planned from the memory available), null (all layers in one pass) or a layer count."""
    if value == "auto":
        return value
    try:
        return _sparsity_int(1, CHUNK_LAYERS_MAX, nullable=True)(value)
    except _Invalid:
        raise _Invalid(f"must be auto, null or an integer in [1, {CHUNK_LAYERS_MAX}], got {value!r}") from None


class SparsitySection(_Section):
    """The ``sparsity`` section; every key has a default (``clipprune.sparsity.SparsityConfig``)."""

    method: _registry_type("sparsity.method") = "cap"
    mask_type: _typed(str, _mask_type) = "unstructured"
    targets: _typed(tuple, lambda value: check_targets(value)) = (0.5, 0.6, 0.75)
    towers: Towers = ("vision",)
    loss: _registry_type("sparsity.loss") = "contrastive"
    batch_size: _typed(int, _sparsity_int(1, BATCH_MAX)) = 32
    num_grads: _typed(int, _sparsity_int(1, NUM_GRADS_MAX)) = 1024
    damp: _typed(float, _float(0.0, low_open=True)) = 1e-7
    fisher_block_size: _typed(int, _sparsity_int(1, FISHER_BLOCK_MAX)) = 50
    fisher_dtype: _choice_type(*FISHER_DTYPES) = "float32"
    chunk_layers: _typed(int | str | None, _chunk_layers) = "auto"
    offload: Bool = False
    hessian_damp: _typed(float, _float(0.0, low_open=True)) = 0.01
    num_recomputations: _typed(int, _sparsity_int(1, RECOMPUTATIONS_MAX)) = 1
    options: _typed(dict, _mapping("loss options")) = {}
    nproc: NProc = 1                # data-parallel processes under torchrun (calibration batches; not in the artifact)

    @model_validator(mode="after")
    def _steps_need_a_target(self):
        """N:M fixes the sparsity itself: there are no intermediate targets to step through."""
        if self.num_recomputations > 1 and self.mask.kind == "nm":
            raise ParamError(f"sparsity.num_recomputations must be 1 with an N:M sparsity.mask_type (the pattern "
                             f"fixes the sparsity; there is no intermediate target), got {self.num_recomputations}")
        return self

    @model_validator(mode="after")
    def _options(self):
        table = LOSS_OPTIONS.get(self.loss)
        if table is not None:
            options = _check_options("sparsity.options", self.options, table, f"loss {self.loss!r}")
            return self.model_copy(update={"options": options})
        return self

    @property
    def mask(self) -> MaskType:
        return parse_mask_type(self.mask_type)


GRADUAL_RAMPS = ("cubic", "linear")


class GradualSection(_Section):
    """The ``gradual`` section (stage sparse_gradual): prune in ``steps`` steps from ``initial`` to ``final``
    sparsity with the ``sparsity`` method, fine-tuning against the dense model (``distill`` loss and optimiser
    options) for ``epochs`` after each step; ``steps: 1`` is one-shot + fine-tune."""

    method: _typed(str | None, _registry("sparsity.method", nullable=True)) = "magnitude"  # null: sparsity.method
    mask_type: _typed(str, lambda value: _mask_type(value, "gradual.mask_type")) = "unstructured"  # this stage's pattern (sparsity.mask_type is sparse_prune's)
    initial: _typed(float, _float(0.0, 1.0, high_open=True)) = 0.5
    final: _typed(float, _float(0.0, 1.0, low_open=True, high_open=True)) = 0.9
    steps: _typed(int, _int(1, RECOMPUTATIONS_MAX)) = 2
    epochs: _typed(int, _int(1, EPOCHS_MAX)) = 1
    ramp: _choice_type(*GRADUAL_RAMPS) = "cubic"
    num_samples: OptionalSamples = 64  # fine-tuning images (seeded subset of the train split); null = all
    num_grads: _typed(int, _sparsity_int(1, NUM_GRADS_MAX)) = 64  # per-sample gradients per pruning step
    warmup_steps: _typed(int, _int(0)) = 0  # of each fine-tuning run (distill.warmup_steps is the distill stage's)

    @model_validator(mode="after")
    def _ramp_goes_up(self):
        if self.final < self.initial:
            raise ParamError(f"gradual.final must be >= gradual.initial ({self.initial}): sparsity only grows, "
                             f"got {self.final}")
        if self.steps > 1 and parse_mask_type(self.mask_type, "gradual.mask_type").kind == "nm":
            raise ParamError(f"gradual.steps must be 1 (one-shot + fine-tune) with an N:M gradual.mask_type "
                             f"({self.mask_type} fixes the sparsity; there is no schedule of sparsities), "
                             f"got {self.steps}")
        return self


# ------------------------------------------------------------------------------------------ the whole file
class Params(BaseModel):
    """All of params.yaml. A field is None when its key is absent (defaults are not validated; an explicit
    ``null`` is, and fails); :func:`parse_params` ``need=`` makes keys required."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    seed: Seed = None
    model: Text = None
    model_files: Text = None
    data: DataSection = None
    calibrate: CalibrateSection = None
    score: ScoreSection = None
    search: SearchSection = None
    tune: TuneSection = None
    evaluate: EvaluateSection = None
    onnx: OnnxSection = None
    report: ReportSection = ReportSection()
    distill: DistillSection = None
    sparsity: SparsitySection = None
    gradual: GradualSection = None

    @model_validator(mode="after")
    def _score_files_in_the_data(self):
        """label_free's prompt files must be inside data/raw/<data.name>/, which the score stage depends on."""
        if self.score is None or self.data is None:
            return self
        inside = f"{RAW_DIR}/{self.data.name}"
        for key in ("classnames", "templates"):
            value = self.score.options.get(key) if self.score.criterion == "label_free" else None
            if value is None:
                continue
            problem = _path_problem(value)
            if problem or PurePosixPath(value).parts[:3] != tuple(inside.split("/")):
                raise ParamError(f"score.options.{key} must be a relative path inside {inside}/ "
                                 f"({problem or 'the data the score stage depends on'}), got {value!r}")
        return self


def parse_params(raw: Mapping, *, need: Iterable[str] = (),
                 choices: Mapping[str, Iterable[str]] | None = None) -> Params:
    """Validate a whole params mapping (as :func:`clipprune.params.load_params` returns it).

    ``need``: top-level keys the caller reads (an absent one is an error). ``choices``: registered names
    per dotted key (``"score.criterion"``, ``"score.loss"``, ``"search.method"``, ``"sparsity.method"``,
    ``"sparsity.loss"``). ParamError (one line naming the key) on the first problem found.
    """
    context = {"choices": {key: tuple(names) for key, names in (choices or {}).items()}}
    try:
        params = Params.model_validate(dict(raw), context=context)
    except ValidationError as err:
        raise ParamError(_first_message(err)) from None
    for key in need:
        if key not in params.model_fields_set:
            raise ParamError(f"{key} is required in params.yaml but missing")
    return params


def parse_section(name: str, value: Any, *, choices: Mapping[str, Iterable[str]] | None = None):
    """One section on its own (``parse_section("sparsity", {...})``), for library callers and tests."""
    return getattr(parse_params({name: value}, need=(name,), choices=choices), name)


# ------------------------------------------------------------------------------------------ messages
def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple) -> list[str]:
    """The keys of the model at ``loc`` (a path of field names from the top)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _unknown_key_message(key: str, name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(known)}"
    return f"{key}: unknown key; {hint}"


def _first_message(err: ValidationError) -> str:
    errors = err.errors(include_url=False)
    # an unknown key first: `constrant` next to a missing `constraint` is the typo to report
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    return _message(errors[0])


def _message(error: dict) -> str:
    loc, kind = tuple(error["loc"]), error["type"]
    key = _dotted(loc)
    if kind == "extra_forbidden":
        name = str(loc[-1])
        if len(loc) == 1:
            close = difflib.get_close_matches(name, list(Params.model_fields), n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(Params.model_fields)}"
            return f"{key}: unknown top-level key; {hint}"
        return _unknown_key_message(key, name, _fields_at(loc[:-1]))
    if kind == "missing":
        return f"{key} is required in params.yaml but missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key} must be a mapping of its keys to values, got {error.get('input')!r}"
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ParamError):  # a whole message (it names its keys itself)
            return str(cause)
        if isinstance(cause, _Invalid):
            return f"{key} {cause}"
    return f"{key}: {error.get('msg')}, got {error.get('input')!r}"  # not expected: every field has a check


def main(argv: list[str] | None = None) -> int:
    """``python -m clipprune.config [params.yaml]``: check a params file without running a stage.

    For keys no stage depends on (a top-level typo makes ``dvc repro`` run nothing). Registered names are
    only checked as non-empty strings here; the stages check them against their registries.
    """
    import sys

    from .params import load_params

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"
    try:
        parse_params(load_params(path))
    except ParamError as err:
        print(f"{path}: error: {err}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
