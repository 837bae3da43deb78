"""Stage export: slice the model by the tuned masks (scales folded in) into artifacts/models/pruned/."""
import time

from _common import run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.models.pruned import export_pruned
from clipprune.models import load_model
from clipprune.models.masks import check_scales, load_masks, validate_masks

# every path is named once, on the stage's cmd in dvc.yaml
MASKS, OUT = stage_paths("export", "masks", "out", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("model", "tune"))
    model = load_model(p.model)
    masks = load_masks(MASKS)
    validate_masks(model, masks, str(MASKS))  # a mismatch names the file, not an internal variable
    check_scales(masks, str(MASKS), p.tune.max_scale)  # the range tune keeps its scales in
    start = time.perf_counter()
    export_pruned(model, masks, OUT)
    print(f"export: wrote {OUT} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_stage("export", main)
