"""params.yaml validated once (clipprune.config): unknown keys, bounds, paths, cross-field rules, one-line errors."""
from __future__ import annotations

import copy
import itertools
import re
import textwrap

import pytest
from ruamel.yaml import YAML

from clipprune import config
from clipprune.config import (BATCH_MAX, FISHER_BLOCK_MAX, NUM_GRADS_MAX, SAMPLES_MAX, SEED_MAX, check_warmup,
                              parse_params, parse_section)
from clipprune.errors import ParamError
from clipprune.params import load_params
from pipeline_utils import DELETE, REPO, set_key

DEFAULT = load_params(REPO / "params.yaml")


def edited(*edits) -> dict:
    """The default params with ``(dotted key, value)`` edits; a value of ``DELETE`` removes the key."""
    params = copy.deepcopy(DEFAULT)
    for key, value in edits:
        set_key(params, key, value)
    return params




def error(params: dict, **kwargs) -> str:
    with pytest.raises(ParamError) as info:
        parse_params(params, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- the files we ship parse

def test_the_default_params_parse_into_typed_sections():
    p = parse_params(DEFAULT, need=("seed", "model", "model_files", "data", "calibrate", "score", "search", "tune",
                                    "evaluate", "report", "distill", "sparsity"), choices=registries())
    assert p.seed == 0 and p.model == "fixture:tiny_clip"
    assert str(p.data.root) == "data/raw/digits"
    assert str(p.data.path("train_images")) == "data/raw/digits/digits/images/train"
    assert p.score.towers == ("vision",) and p.distill.towers == ("vision",) and p.sparsity.towers == ("vision",)
    assert p.search.constraint == 0.5 and isinstance(p.search.constraint, float)
    assert p.tune.damp == 0.01 and p.evaluate.latency.repeats == 10 and p.evaluate.datasets == ()
    assert p.report.dpi == 100 and p.sparsity.mask.name == "unstructured" and p.sparsity.targets == (0.5, 0.6, 0.75)
    assert [(r.keep, r.blocks) for r in p.distill.schedule][:2] == [(0.2, 3), (0.3, 2)]


def _yaml_blocks(text: str) -> list[str]:
    """The ```yaml blocks of a markdown text (indented ones too), dedented."""
    return [textwrap.dedent(body) for body in re.findall(r"^[ \t]*```yaml\n(.*?)^[ \t]*```", text, re.S | re.M)]


def _merge(base: dict, fragment: dict) -> dict:
    out = dict(base)
    for key, value in fragment.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_the_readme_params_fragments_parse():
    """Every params.yaml fragment the README shows (real-size recipe, evaluation sets), over the defaults."""
    yaml = YAML(typ="safe", pure=True)
    fragments = [yaml.load(block) for block in _yaml_blocks((REPO / "README.md").read_text())]
    fragments = [f for f in fragments if isinstance(f, dict) and set(f) <= set(config.Params.model_fields)]
    assert len(fragments) >= 3  # model + model_files, the COCO data / calibrate / evaluate recipe, evaluate.datasets
    for fragment in fragments:
        parsed = parse_params(_merge(DEFAULT, fragment))
        for section in fragment:
            assert section in parsed.model_fields_set
    coco = next(f for f in fragments if "data" in f)
    assert parse_params(_merge(DEFAULT, coco)).data.layout.classification is None


def _readme_experiments() -> list[list[tuple[str, str]]]:
    """The ``-S key=value`` sets of every ``dvc exp run`` in the README (comma lists: their cross product)."""
    text = re.sub(r"\\\n|-S\n", lambda m: " " if m[0] != "-S\n" else "-S ", (REPO / "README.md").read_text())
    runs = []
    for line in re.findall(r"dvc exp run[^\n`]*", text):
        sets = re.findall(r"-S\s+'?([A-Za-z_][\w.]*)=((?:\"[^\"]*\"|[^\s'`])+)'?", line)
        runs += [list(zip([k for k, _ in sets], values))
                 for values in itertools.product(*[value.split(",") for _, value in sets])] if sets else []
    return runs


def test_the_readme_experiments_parse():
    runs = _readme_experiments()
    assert [("search.constraint", "0.612")] in runs and len(runs) >= 10
    assert any(("score.criterion", "taylor_entropy") in run and ("search.method", "adaptive") in run for run in runs)
    yaml = YAML(typ="safe", pure=True)  # as DVC writes a -S value into params.yaml and load_params reads it
    for run in runs:
        parse_params(edited(*[(key, yaml.load(f"v: {text}")["v"]) for key, text in run]), choices=registries())


def registries() -> dict:
    """The registered names, as the stages pass them."""
    from clipprune.scoring import available_criteria, available_losses
    from clipprune.search import available_searches
    from clipprune.sparsity import available_methods

    return {"score.criterion": available_criteria(), "score.loss": available_losses(),
            "search.method": available_searches(), "sparsity.method": available_methods(),
            "sparsity.loss": available_losses()}


# ---------------------------------------------------------------- unknown keys

def _keys(node: dict, prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict) and key not in ("options",):
            yield from _keys(value, f"{dotted}.")


def _typo(name: str) -> str:
    """The last two different adjacent letters swapped: ``constraint`` -> ``constraitn``, ``loss`` -> ``lsos``."""
    i = max(i for i in range(len(name) - 1) if name[i] != name[i + 1])
    return name[:i] + name[i + 1] + name[i] + name[i + 2:]


@pytest.mark.parametrize("key", [k for k in _keys(DEFAULT) if len(k.rsplit(".", 1)[-1]) > 3])
def test_every_key_misspelled_is_refused_with_did_you_mean(key):
    *parents, last = key.split(".")
    params = copy.deepcopy(DEFAULT)
    node = params
    for part in parents:
        node = node[part]
    node[_typo(last)] = node[last]  # next to the real key: a typo must not be ignored
    message = error(params)
    where = ".".join([*parents, _typo(last)])
    if parents:
        assert message == f"{where}: unknown key; did you mean `{last}`?"
    else:
        assert message == f"{where}: unknown top-level key; did you mean `{last}`?"


@pytest.mark.parametrize("edits, expected", [
    ((("search.constriant", 0.3),), "search.constriant: unknown key; did you mean `constraint`?"),
    ((("serach", {"constraint": 0.3}),), "serach: unknown top-level key; did you mean `search`?"),
    ((("tune.lsq", DELETE), ("tune.lqs", True)), "tune.lqs: unknown key; did you mean `lsq`?"),
    ((("report.resolution", 300),), "report.resolution: unknown key; known: dpi"),
    ((("shiny", 1),), "shiny: unknown top-level key; known: seed, model, model_files, data, calibrate, score, "
                      "search, tune, evaluate, onnx, report, distill, sparsity, gradual"),
    ((("data.archives", [{"source": "a.zip", "sha": None}]),),
     "data.archives[0].sha: unknown key; did you mean `sha256`?"),
    ((("evaluate.datasets", [{"name": "x", "type": "coco_karpathy", "root": "data/eval/x",
                              "anotation": "data/eval/x.json"}]),),
     "evaluate.datasets[0].anotation is not a field of type coco_karpathy (did you mean `annotation`?)"),
])
def test_unknown_keys_anywhere(edits, expected):
    assert error(edited(*edits)) == expected


def test_an_unknown_key_is_reported_before_the_missing_one_it_misspells():
    assert error(edited(("search.constraint", DELETE), ("search.constrant", 0.5))) == \
        "search.constrant: unknown key; did you mean `constraint`?"


@pytest.mark.parametrize("edits, expected", [
    ((("score.options", {"temperature": 2}),),
     "score.options: unknown option(s) temperature for criterion 'fisher' with loss 'contrastive'; known: keep_grads"),
    ((("score.loss", "entropy"), ("score.options", {"inv_temprature": 2})),
     "score.options: unknown option(s) inv_temprature for criterion 'fisher' with loss 'entropy'; known: keep_grads, "
     "inv_temperature; did you mean `inv_temperature`?"),
    ((("search.options", {"depth": 2}),), "search.options: unknown option(s) depth for method 'mac'; known: normalize"),
    ((("search.method", "adaptive"), ("search.options", {"halvngs": 3})),
     "search.options: unknown option(s) halvngs for method 'adaptive'; known: halvings, loss, inv_temperature, "
     "batch_size; did you mean `halvings`?"),
    ((("search.method", "adaptive"), ("search.options", {"loss_inc_thresh": 0.1})),
     "search.options.loss_inc_thresh is not an option: set search.loss_inc_thresh"),
    ((("sparsity.options", {"inv_temperature": 3}),),
     "sparsity.options: unknown option(s) inv_temperature for loss 'contrastive'; known: none"),
])
def test_unknown_method_options(edits, expected):
    assert error(edited(*edits)) == expected


def test_option_tables_match_the_registries():
    from clipprune.scoring.losses import LOSSES
    from clipprune.scoring.registry import CRITERIA
    from clipprune.search.registry import SEARCHES

    assert {n: list(o) for n, o in CRITERIA.available().items()} == \
        {n: list(t) for n, t in sorted(config.CRITERION_OPTIONS.items())}
    assert {n: list(o) for n, o in LOSSES.available().items()} == \
        {n: list(t) for n, t in sorted(config.LOSS_OPTIONS.items())}
    # adaptive's loss_inc_thresh is a key of the search section; progress is not a user option
    assert {n: [o for o in opts if o not in ("loss_inc_thresh", "progress")] for n, opts in SEARCHES.available().items()} == \
        {n: list(t) for n, t in sorted(config.SEARCH_OPTIONS.items())}
    for name in config.CRITERIA_WITH_LOSS_OPTIONS:  # these pass every other option on to the loss
        assert CRITERIA.get(name).__wrapped__.__code__.co_flags & 0x08  # **loss_options


# ---------------------------------------------------------------- values and bounds

@pytest.mark.parametrize("key, value, expected", [
    ("seed", 2**70, f"seed must be <= {SEED_MAX}, got {2**70}"),
    ("seed", 2**63, f"seed must be <= {SEED_MAX}, got {2**63}"),
    ("seed", -1, "seed must be >= 0, got -1"),
    ("seed", 1.5, "seed must be an integer, got 1.5 (float)"),
    ("seed", None, "seed must be an integer, got None (NoneType)"),
    ("report.dpi", 100000, "report.dpi must be <= 600, got 100000"),
    ("report.dpi", 10, "report.dpi must be >= 30, got 10"),
    ("evaluate.latency.batch_size", 10**9, f"evaluate.latency.batch_size must be <= {BATCH_MAX}, got 1000000000"),
    ("evaluate.latency.warmup", -1, "evaluate.latency.warmup must be >= 0, got -1"),
    ("evaluate.latency.repeats", 10**9, "evaluate.latency.repeats must be <= 100000, got 1000000000"),
    ("evaluate.batch_size", 10**6, f"evaluate.batch_size must be <= {BATCH_MAX}, got 1000000"),
    ("evaluate.max_retrieval_images", 0, "evaluate.max_retrieval_images must be >= 1, got 0"),
    ("evaluate.retrieval_split", "test", "evaluate.retrieval_split must be one of train, val; got 'test'"),
    ("evaluate.steps", "yes", "evaluate.steps must be true or false, got 'yes'"),
    ("calibrate.num_samples", SAMPLES_MAX + 1,
     f"calibrate.num_samples must be <= {SAMPLES_MAX}, got {SAMPLES_MAX + 1}"),
    ("calibrate.num_samples", "many", "calibrate.num_samples must be an integer, got 'many' (str)"),
    ("calibrate.num_samples", True, "calibrate.num_samples must be an integer, got True (bool)"),
    ("score.batch_size", BATCH_MAX + 1, f"score.batch_size must be <= {BATCH_MAX}, got {BATCH_MAX + 1}"),
    ("score.towers", "audio", "score.towers must be one of vision, text, both; got 'audio'"),
    ("score.granularity", "token", "score.granularity must be one of batch, sample; got 'token'"),
    ("score.criterion", None, "score.criterion must be a non-empty string, got None (NoneType)"),
    ("score.options", [1], "score.options must be a mapping of option names to values, got [1]"),
    ("search.constraint", 1.5, "search.constraint must be in (0, 1], got 1.5"),
    ("search.constraint", 0, "search.constraint must be in (0, 1], got 0"),
    ("search.constraint", float("nan"), "search.constraint must be in (0, 1], got nan"),
    ("search.constraint", "half", "search.constraint must be a number in (0, 1], got 'half' (str)"),
    ("search.constraint", True, "search.constraint must be a number in (0, 1], got True (bool)"),
    ("search.metric", "flops", "search.metric must be one of mac, params, latency; got 'flops'"),
    ("search.loss_inc_thresh", -0.1, "search.loss_inc_thresh must be >= 0, got -0.1"),
    ("search.loss_inc_thresh", float("nan"), "search.loss_inc_thresh must be a finite number, got nan"),
    ("search.holdout_samples", 1, "search.holdout_samples must be >= 2, got 1"),
    ("search.holdout_samples", SAMPLES_MAX + 1,
     f"search.holdout_samples must be <= {SAMPLES_MAX}, got {SAMPLES_MAX + 1}"),
    ("tune.damp", -0.1, "tune.damp must be >= 0, got -0.1"),
    ("tune.damp", float("inf"), "tune.damp must be a finite number, got inf"),
    ("tune.damp", "small", "tune.damp must be a finite number, got 'small' (str)"),
    ("tune.max_scale", 0, "tune.max_scale must be > 0, got 0"),
    ("tune.rearrange", 1, "tune.rearrange must be true or false, got 1"),
    ("tune.batch_size", 0, "tune.batch_size must be >= 1, got 0"),
    ("tune.nproc", 0, "tune.nproc must be >= 1, got 0"),
    ("score.nproc", 257, "score.nproc must be <= 256, got 257"),
    ("score.precision", "half", "score.precision must be one of float32, bfloat16, float16; got 'half'"),
    ("score.checkpointing", "yes", "score.checkpointing must be true or false, got 'yes'"),
    ("score.device", "tpu", "score.device must be one of auto, cpu, cuda; got 'tpu'"),
    ("evaluate.nproc", 1.5, "evaluate.nproc must be an integer, got 1.5 (float)"),
    ("distill.batch_size", BATCH_MAX * 2, f"distill.batch_size must be <= {BATCH_MAX}, got {BATCH_MAX * 2}"),
    ("distill.nproc", 1000, "distill.nproc must be <= 256, got 1000"),
    ("distill.epochs", 0, "distill.epochs must be >= 1, got 0"),
    ("distill.num_samples", 0, "distill.num_samples must be >= 1, got 0"),
    ("distill.num_samples", "all", "distill.num_samples must be an integer or null, got 'all' (str)"),
    ("distill.base_lr", "1e-3", "distill.base_lr must be a finite number, got '1e-3' (str)"),
    ("distill.logit_scale", -1.0, "distill.logit_scale must be > 0, got -1.0"),
    ("distill.warmup_steps", -1, "distill.warmup_steps must be >= 0, got -1"),
    ("distill.device", "tpu", "distill.device must be one of auto, cpu, cuda; got 'tpu'"),
    ("sparsity.fisher_block_size", 10**9,
     f"sparsity.fisher_block_size must be an integer in [1, {FISHER_BLOCK_MAX}], got 1000000000"),
    ("sparsity.num_grads", NUM_GRADS_MAX + 1,
     f"sparsity.num_grads must be an integer in [1, {NUM_GRADS_MAX}], got {NUM_GRADS_MAX + 1}"),
    ("sparsity.batch_size", 0, f"sparsity.batch_size must be an integer in [1, {BATCH_MAX}], got 0"),
    ("sparsity.mask_type", "1:10000", "sparsity.mask_type N:M needs 0 < N < M <= 4096, got '1:10000'"),
    ("model", 42, "model must be a non-empty string, got 42 (int)"),
    ("data", [1], "data must be a mapping of its keys to values, got [1]"),
    ("data.layout", None, "data.layout must be a mapping of its keys to values, got None"),
    ("data.name", "../outside", "data.name must be a plain folder name (letters, digits, '.', '_', '-'; no '/', "
                                "'\\' or '..', not starting with '.'), got '../outside'"),
    ("data.archives", [], "data.archives must be a non-empty list of {source, sha256} entries, got []"),
    ("calibrate.num_samples", DELETE, "calibrate.num_samples is required in params.yaml but missing"),
])
def test_bad_values_name_the_key_and_the_bound(key, value, expected):
    assert error(edited((key, value))) == expected


@pytest.mark.parametrize("edits", [
    [("seed", SEED_MAX)], [("report.dpi", 600)], [("report.dpi", 30)], [("evaluate.latency.batch_size", BATCH_MAX)],
    [("sparsity.fisher_block_size", FISHER_BLOCK_MAX)], [("calibrate.num_samples", SAMPLES_MAX)],
    [("search.constraint", 1)], [("tune.damp", 0)], [("distill.nproc", 256), ("distill.batch_size", 512)],
    [("sparsity.mask_type", "2:4")], [("evaluate.max_retrieval_images", None)],
])
def test_values_at_the_bounds_are_accepted(edits):
    parse_params(edited(*edits))


def test_option_values():
    assert error(edited(("score.criterion", "taylor_entropy"), ("score.loss", "entropy"),
                        ("score.options", {"inv_temperature": -1}))) == \
        "score.options.inv_temperature must be > 0, got -1"
    assert error(edited(("score.criterion", "magnitude"), ("score.options", {"norm": "l3"}))) == \
        "score.options.norm must be one of l2, l1; got 'l3'"
    assert error(edited(("score.options", {"keep_grads": "yes"}))) == \
        "score.options.keep_grads must be true or false, got 'yes'"
    adaptive = ("search.method", "adaptive")
    for options, expected in (({"halvings": 31}, "search.options.halvings must be <= 30, got 31"),
                              ({"batch_size": 1}, "search.options.batch_size must be >= 2, got 1"),
                              ({"loss": "max_logit"}, "search.options.loss must be one of entropy, "
                                                      "entropy_image_text, contrastive; got 'max_logit'"),
                              ({"inv_temperature": 0}, "search.options.inv_temperature must be > 0, got 0")):
        assert error(edited(adaptive, ("search.options", options))) == expected
    assert error(edited(("search.method", "threshold"), ("search.options", {"normalize": "layer"}))) == \
        "search.options.normalize must be one of mean, max, sum, none; got 'layer'"
    assert error(edited(("search.options", {"normalize": "mean"}))) == \
        "search.options.normalize must be one of none, layer; got 'mean'"
    typed = parse_params(edited(("score.loss", "entropy"), ("score.options", {"inv_temperature": 15})))
    assert typed.score.options == {"inv_temperature": 15.0} and isinstance(typed.score.options["inv_temperature"],
                                                                           float)


def test_registered_names_are_checked_against_the_choices_given():
    params = edited(("score.criterion", "taylor"))
    parse_params(params)  # without the registry: any non-empty name
    assert error(params, choices={"score.criterion": ["magnitude", "fisher"]}) == \
        "score.criterion must be one of fisher, magnitude; got 'taylor'"
    assert error(edited(("sparsity.method", "obs2000")), choices={"sparsity.method": ["cap", "magnitude"]}) == \
        "sparsity.method must be one of cap, magnitude; got 'obs2000'"


def test_need_makes_absent_keys_required():
    params = edited(("distill", DELETE), ("report", DELETE))
    assert error(params, need=("seed", "distill")) == "distill is required in params.yaml but missing"
    assert parse_params(params).report.dpi == 100  # report is optional: its default
    assert parse_params(params).distill is None


# ---------------------------------------------------------------- paths stay inside the project

@pytest.mark.parametrize("value, why", [
    ("/etc/passwd", "not absolute"), ("~/coco/train2017", "not absolute"), ("../digits/images/train", "no '..'"),
    ("digits/../../../calibrate/images", "no '..'"), ("digits\\..\\x", "'/' as the separator, no '\\'"),
    ("", "a non-empty string"), (3, "a non-empty string"),
])
@pytest.mark.parametrize("key", ["train_images", "val_captions", "classification", "templates"])
def test_layout_paths_outside_the_dataset_folder_are_refused(key, value, why):
    assert error(edited((f"data.layout.{key}", value))) == \
        f"data.layout.{key} must be a relative path inside data/raw/<data.name>/ ({why}), got {value!r}"


def test_layout_paths_inside_are_accepted_and_classification_needs_its_files():
    parse_params(edited(("data.layout.train_images", "./a/b..c/train")))
    parse_params(edited(("data.layout.classification", None), ("data.layout.classnames", DELETE),
                        ("data.layout.templates", DELETE)))
    assert error(edited(("data.layout.classnames", DELETE))) == \
        "data.layout.classnames is required in params.yaml but missing (data.layout.classification is set)"


@pytest.mark.parametrize("root, why", [
    ("/datasets/imagenet/val", "not absolute"), ("data/eval/../../x", "no '..'"),
    ("data/raw/digits/val", "the folder the evaluate stages depend on"), ("imagenet/val", "the folder the evaluate "
                                                                         "stages depend on"),
])
def test_eval_dataset_paths_stay_in_data_eval(root, why):
    entry = {"name": "imagenet1k", "type": "imagefolder", "root": root, "classnames": "data/eval/c.json",
             "templates": "data/eval/t.json"}
    assert error(edited(("evaluate.datasets", [entry]))) == \
        f"evaluate.datasets[0].root must be a relative path inside data/eval/ ({why}), got {root!r}"
    inside = edited(("evaluate.datasets", [dict(entry, root="data/eval/imagenet1k/val")]))
    specs = parse_params(inside).evaluate.datasets
    assert str(specs[0].root) == "data/eval/imagenet1k/val" and specs[0].task == "zeroshot"


def test_label_free_prompt_files_stay_in_the_dataset_folder():
    inside = "data/raw/digits/digits/classification"
    prompts = {"text_set": "prompts", "classnames": f"{inside}/classnames.json",
               "templates": f"{inside}/templates.json"}
    base = ("score.criterion", "label_free")
    parse_params(edited(base, ("score.options", prompts)))
    assert error(edited(base, ("score.options", dict(prompts, templates="data/fixtures/templates.json")))) == \
        ("score.options.templates must be a relative path inside data/raw/digits/ (the data the score stage depends "
         "on), got 'data/fixtures/templates.json'")
    assert error(edited(base, ("score.options", dict(prompts, classnames="/tmp/c.json")))) == \
        "score.options.classnames must be a relative path inside data/raw/digits/ (not absolute), got '/tmp/c.json'"


# ---------------------------------------------------------------- values that make others meaningless

@pytest.mark.parametrize("edits, expected", [
    ((("distill.nproc", 3),), "distill.batch_size must be divisible by distill.nproc (3) so every process gets an "
                              "equal share of the global batch, got 64"),
    ((("distill.min_lr", 1.0),), "distill.min_lr must not exceed the peak lr base_lr*batch_size/256 = 0.0005, got 1.0"),
    ((("distill.mode", "retrain"), ("distill.retrain", {"mask_lr_scale": 10.0})),
     "distill.retrain.schedule is required in params.yaml but missing (distill.mode: retrain)"),
    ((("distill.retrain.schedule", [{"keep": 0.5, "data": 0.5, "blocks": 1},
                                    {"keep": 0.4, "data": 0.5, "blocks": 1}]),),
     "distill.retrain.schedule[1].keep must be greater than the previous row's (0.5), got 0.4"),
    ((("score.criterion", "label_free"), ("score.options", {"classnames": "data/raw/digits/c.json"})),
     "score.options.classnames / templates are only used with score.options.text_set: prompts"),
    ((("score.criterion", "label_free"), ("score.options", {"text_set": "prompts"})),
     "score.options.classnames is required with score.options.text_set: prompts (the path of a JSON file)"),
    ((("score.criterion", "label_free"), ("score.granularity", "sample"), ("score.towers", "both"),
      ("score.options", {"text_set": "prompts", "classnames": "data/raw/digits/c.json",
                         "templates": "data/raw/digits/t.json"})),
     "score.options.text_set=prompts with score.granularity=sample can score only the vision tower (per-sample "
     "text masks cannot be shared by the prompts); use score.towers: vision"),
    ((("sparsity.targets", [0.5, 0.5]),), "sparsity.targets must not repeat a value, got [0.5, 0.5]"),
])
def test_contradicting_values_are_refused(edits, expected):
    assert error(edited(*edits)) == expected


def test_warmup_longer_than_the_run_is_refused():
    check_warmup(0, 1, 1, 1)
    check_warmup(9, 10, 5, 2)
    with pytest.raises(ParamError, match=r"^distill\.warmup_steps must be < the 1 optimizer steps of this run "
                                         r"\(distill\.epochs 1 x 1 steps per epoch\), got 10: "):
        check_warmup(10, 1, 1, 1)
    with pytest.raises(ParamError, match="got 66"):
        check_warmup(66, 66, 22, 3)


# ---------------------------------------------------------------- library entry points and the command line

def test_parse_section_for_library_callers():
    sparsity = parse_section("sparsity", {"targets": [0.75, 0.5]})
    assert sparsity.targets == (0.5, 0.75) and sparsity.method == "cap"
    with pytest.raises(ParamError, match=r"^sparsity\.blocksize: unknown key; did you mean `fisher_block_size`\?$"):
        parse_section("sparsity", {"blocksize": 4})


def test_command_line(tmp_path, capsys):
    assert config.main([str(REPO / "params.yaml")]) == 0
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("search:\n", "serach:\n", 1))
    assert config.main([str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"{bad}: error: serach: unknown top-level key; did you mean `search`?"
