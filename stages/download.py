"""Stage download: fetch and verify the dataset archives named in params `data`, extract to data/raw/<name>/."""
from _common import run_stage
from clipprune.config import parse_params
from clipprune.data.sources import download_dataset


def main(params: dict) -> None:
    data = parse_params(params, need=("data",)).data
    target = download_dataset(data.archives, data.root)
    print(f"download: extracted {data.name} into {target}")


if __name__ == "__main__":
    run_stage("download", main)
