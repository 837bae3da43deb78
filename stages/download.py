"""Stage download: fetch and verify the dataset archives named in params `data`, extract to data/raw/<name>/."""
from pathlib import Path

from _common import run_stage
from clipprune.data.sources import check_dataset_name, download_dataset
from clipprune.params import get, get_str


def main(params: dict) -> None:
    name = check_dataset_name(get_str(params, "data.name"))
    target = download_dataset(get(params, "data.archives"), Path("data/raw") / name)
    print(f"download: extracted {name} into {target}")


if __name__ == "__main__":
    run_stage("download", main)
