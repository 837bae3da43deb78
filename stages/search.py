"""Stage search: binary head/neuron masks under `search.constraint` of the MAC or params budget.

`search.metric: latency` budgets the latency table of stage latency_table (measured on this device at
`evaluate.latency.batch_size`; search/latency.py). `search.align: N` > 1 rounds each layer's kept neurons to a
multiple of N within the same budget (search/align.py).

Methods that measure the model (`adaptive`, AMP) instead get the model and a held-out split of the train
data (`search.holdout_samples` images not used for calibration, drawn with `seed`); their widths follow
`search.loss_inc_thresh` and `search.constraint` is not used.
"""
import math
import time

from _common import run_stage, stage_paths
from clipprune import flops
from clipprune.config import parse_params
from clipprune.deploy.latency_table import device_name, read_table
from clipprune.errors import MaskError
from clipprune.io import commit_together, write_json
from clipprune.models import load_model
from clipprune.models.masks import full_masks, save_masks
from clipprune.scoring import load_scores
from clipprune.search import available_searches, check_scores, get_search, mask_summary
from clipprune.search.align import align_neurons
from clipprune.search.latency import PICOSECONDS, latency_cost, latency_search, predicted_fraction, tower_latencies
from clipprune.data.holdout import holdout_loader

# every path is named once, on the stage's cmd in dvc.yaml
SCORES, CALIBRATION, LATENCY, OUT, TRACE, TIMING = stage_paths(
    "search", "scores", "calibration", "latency", "out", "trace", "timing", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "search"),
                     choices={"search.method": available_searches()})
    method, metric, constraint, options = p.search.method, p.search.metric, p.search.constraint, p.search.options
    search = get_search(method)
    scores = load_scores(SCORES)
    model = load_model(p.model)
    context, trace, extra = {}, {"method": method, "layers": []}, {}
    if search.needs_model:
        extra["loss_inc_thresh"] = p.search.loss_inc_thresh
        holdout = holdout_loader(p.data.path("train_images"), p.data.path("train_captions"), CALIBRATION,
                                 model.preprocess, p.search.holdout_samples, p.seed)
        context = {"model": model, "holdout": holdout, "report": trace}
        print(f"search: method {method} does not use search.constraint ({constraint}); the kept widths follow "
              f"search.loss_inc_thresh={extra['loss_inc_thresh']}")
    start = time.perf_counter()
    views = {tower: model.towers[tower].block_views() for tower in model.towers}
    try:  # scores from another model or with NaN/inf: say which file is at fault
        searched = check_scores(scores.scores, views)
    except MaskError as err:
        raise MaskError(f"{SCORES}: {err}") from None
    views = {tower: views[tower] for tower in searched}
    models = None
    if metric == "latency":
        # the table stage measured at evaluate.latency.batch_size (its param, not this stage's: evaluate settings
        # must not rerun the pruning when the table, and so this stage's dep, is unchanged)
        models = tower_latencies(read_table(LATENCY, p.model, device_name()))
        latency_report = {}
        masks = latency_search(scores.scores, views, constraint, models, options.get("normalize", "none"),
                               report=latency_report)
        trace["latency"] = latency_report
    else:
        masks = search(scores.scores, views, constraint, metric, **context, **extra, **options)
    # a kind without scores (e.g. heads under taylor_entropy) is kept whole: write it out explicitly
    for key, full in full_masks(model, searched).items():
        masks.setdefault(key, full)
    if p.search.align > 1:
        masks = _aligned(masks, scores.scores, views, p.search.align, metric, constraint, models)
        extra["align"] = p.search.align
    wall = time.perf_counter() - start
    summary = mask_summary(masks, views, "mac" if metric == "latency" else metric)
    if models is not None:
        summary["predicted_latency_fraction"] = predicted_fraction(masks, models)
    used = not search.needs_model
    with commit_together():  # masks, trace and timing: all or none (the report stage draws the trace)
        save_masks(OUT, masks, {"method": method, "metric": metric, "constraint": constraint if used else None,
                                "summary": summary, **extra})
        write_json(TRACE, trace)
        write_json(TIMING, {"wall_time_s": wall})
    budget = f"constraint {constraint}" if used else f"loss_inc_thresh {extra['loss_inc_thresh']}, constraint unused"
    kept = (f"{summary['predicted_latency_fraction']:.4f} of the dense latency (predicted; "
            f"{summary['kept_fraction']:.4f} of the MACs)" if models is not None
            else f"{summary['kept_fraction']:.4f} of the prunable {metric} cost")
    print(f"search: {method} kept {kept} ({budget}); wrote {OUT}")


def _aligned(masks, scores, views, align, metric, constraint, models):
    """``masks`` with kept neurons rounded to multiples of ``align`` within the search's own budget."""
    if models is not None:
        towers = sorted({key.split(".")[0] for key in masks})
        fixed = sum(round(models[t].overhead * PICOSECONDS) for t in towers)
        budget = round(constraint * sum(models[t].dense_seconds for t in towers) * PICOSECONDS)
        return align_neurons(masks, scores, views, align, latency_cost(models), budget, fixed)

    def cost(tower, layer, kind, count):
        head_cost, neuron_cost = flops.unit_costs(views[tower][layer], metric)
        return count * (head_cost if kind == "head" else neuron_cost)

    budget = math.floor(constraint * flops.prunable_macs(views, metric))
    return align_neurons(masks, scores, views, align, cost, budget)


if __name__ == "__main__":
    run_stage("search", main)
