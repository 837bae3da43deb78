"""Stage calibrate: sample `calibrate.num_samples` image-caption pairs of the train split with `seed`."""

from _common import run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.data.calibration import sample_calibration_pairs, write_calibration
from clipprune.data.coco import CocoCaptions

# every path is named once, on the stage's cmd in dvc.yaml
OUT, = stage_paths("calibrate", "out", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "data", "calibrate"))
    layout, num_samples = p.data.layout, p.calibrate.num_samples
    dataset = CocoCaptions(p.data.path("train_images"), p.data.path("train_captions"))
    pairs = sample_calibration_pairs(dataset, num_samples, p.seed)
    write_calibration(OUT, pairs, {"seed": p.seed, "num_samples": num_samples,
                                   "images": layout.train_images, "captions": layout.train_captions})
    print(f"calibrate: wrote {len(pairs)} pairs to {OUT}")


if __name__ == "__main__":
    run_stage("calibrate", main)
