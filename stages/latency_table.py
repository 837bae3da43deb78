"""Stage latency_table: the latency lookup table that `search.metric: latency` searches under.

Measured on this machine's CPU (where evaluate measures latency) at `evaluate.latency.batch_size`, with
`evaluate.latency.warmup` / `repeats` rounds, for the towers `score.towers` scores; written to
artifacts/latency/<model>__<device>__b<batch>.json (deploy/latency_table.py). With any other search.metric
the table is not needed: the stage writes only skipped.json saying so (the default pipeline pays nothing),
and the search stage never reads it.
"""
import time

from _common import run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.deploy.latency_table import measure_table, table_name
from clipprune.io import atomic_dir
from clipprune.models import load_model

OUT, = stage_paths("latency_table", "out", main=__name__ == "__main__")
SKIPPED = "skipped.json"


def main(params: dict) -> None:
    import json

    p = parse_params(params, need=("seed", "model", "search", "score", "evaluate"))
    latency = p.evaluate.latency
    if p.search.metric != "latency":
        with atomic_dir(OUT) as tmp:
            (tmp / SKIPPED).write_text(json.dumps({"measured": False, "reason": f"search.metric is "
                                                   f"{p.search.metric}: no latency table needed"}) + "\n")
        print(f"latency_table: search.metric is {p.search.metric}: nothing measured; wrote {OUT / SKIPPED}")
        return
    start = time.perf_counter()
    model = load_model(p.model)
    table = measure_table(model, p.score.towers, latency.batch_size, warmup=latency.warmup,
                          repeats=latency.repeats, points=p.search.latency_points, seed=p.seed,
                          log=lambda line: print(f"latency_table: {line}"))
    name = table_name(table["model"], table["device"], latency.batch_size)
    with atomic_dir(OUT) as tmp:
        (tmp / name).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"latency_table: measured on {table['device']} at batch {latency.batch_size} in "
          f"{time.perf_counter() - start:.1f} s; wrote {OUT / name}")


if __name__ == "__main__":
    run_stage("latency_table", main)
