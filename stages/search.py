"""Stage search: binary head/neuron masks under `search.constraint` of the MAC or params budget."""
import time
from pathlib import Path

from _common import run_stage
from clipprune.errors import MaskError, ParamError
from clipprune.io import write_json
from clipprune.models import load_model
from clipprune.models.masks import save_masks
from clipprune.params import get, get_str
from clipprune.scoring import load_scores
from clipprune.search import (available_searches, check_constraint, check_metric, check_scores, get_search,
                              mask_summary)

SCORES = Path("artifacts/scores/scores.safetensors")
OUT = Path("artifacts/masks/search.safetensors")
TIMING = Path("reports/timing/search.json")


def main(params: dict) -> None:
    method = get_str(params, "search.method", choices=available_searches())
    metric = check_metric(get(params, "search.metric"))
    constraint = check_constraint(get(params, "search.constraint"))
    options = get(params, "search.options", default=None) or {}
    if not isinstance(options, dict):
        raise ParamError(f"search.options must be a mapping of option names to values, got {options!r}")
    scores = load_scores(SCORES)
    model = load_model(get_str(params, "model"))
    start = time.perf_counter()
    views = {tower: model.towers[tower].block_views() for tower in model.towers}
    try:  # scores from another model or with NaN/inf: say which file is at fault
        searched = check_scores(scores.scores, views)
    except MaskError as err:
        raise MaskError(f"{SCORES}: {err}") from None
    views = {tower: views[tower] for tower in searched}
    masks = get_search(method)(scores.scores, views, constraint, metric, **options)
    wall = time.perf_counter() - start
    summary = mask_summary(masks, views, metric)
    save_masks(OUT, masks, {"method": method, "metric": metric, "constraint": constraint,
                            "summary": summary})
    write_json(TIMING, {"wall_time_s": wall})
    print(f"search: {method} kept {summary['kept_fraction']:.4f} of the {metric} budget "
          f"(constraint {constraint}); wrote {OUT}")


if __name__ == "__main__":
    run_stage("search", main)
