"""Stage calibrate: sample `calibrate.num_samples` image-caption pairs of the train split with `seed`."""
from pathlib import Path

from _common import run_stage
from clipprune.data.calibration import sample_calibration_pairs, write_calibration
from clipprune.data.coco import CocoCaptions
from clipprune.data.sources import check_dataset_name
from clipprune.params import get_int, get_str

OUT = Path("data/prepared/calibration.json")


def main(params: dict) -> None:
    root = Path("data/raw") / check_dataset_name(get_str(params, "data.name"))
    images = get_str(params, "data.layout.train_images")
    captions = get_str(params, "data.layout.train_captions")
    seed = get_int(params, "seed", min_value=0)
    num_samples = get_int(params, "calibrate.num_samples", min_value=1)
    dataset = CocoCaptions(root / images, root / captions)
    pairs = sample_calibration_pairs(dataset, num_samples, seed)
    write_calibration(OUT, pairs, {"seed": seed, "num_samples": num_samples,
                                   "images": images, "captions": captions})
    print(f"calibrate: wrote {len(pairs)} pairs to {OUT}")


if __name__ == "__main__":
    run_stage("calibrate", main)
