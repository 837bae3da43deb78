"""Stage sparse_prune: one-shot weight sparsity (`sparsity.method`) at every `sparsity.targets` in one run.

Gradients and Fisher inverses are computed once; the new weights of every target are written compactly
to artifacts/sparse/pruned.safetensors (keys ``<target>/<layer>``), which the `sparsify` stages export
and evaluate one target each.

`sparsity.nproc > 1` relaunches this script under torchrun: each process computes every nproc-th calibration
batch's gradients (or layer inputs), every process receives them all in batch order and runs the same method on
the same numbers, and rank 0 alone writes the outputs.
"""
import json

from _common import data_parallel_stage, relaunch, run_stage, stage_paths
from clipprune.config import parse_params
from clipprune.io import commit_together, save_safetensors, write_json
from clipprune.models import load_model
from clipprune.scoring import available_losses, calibration_loader
from clipprune.sparsity import available_methods, get_method, sparsify, sparsity_config, target_name
from clipprune.sparsity.export import compact_tensors

# every path is named once, on the stage's cmd in dvc.yaml
CALIBRATION, OUT, TIMING = stage_paths("sparse_prune", "calibration", "out", "timing", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "sparsity"),
                     choices={"sparsity.method": available_methods(), "sparsity.loss": available_losses()})
    model_name, seed, config = p.model, p.seed, sparsity_config(p.sparsity)
    nproc = p.sparsity.nproc
    if relaunch("sparse_prune", nproc, {"calibration": CALIBRATION, "out": OUT, "timing": TIMING}):
        print(f"sparse_prune: {nproc} processes finished; wrote {OUT}")
        return
    with data_parallel_stage() as ctx:
        model = load_model(model_name)
        loader = None
        if get_method(config.method).needs_data:
            loader = calibration_loader(p.data.path("train_images"), p.data.path("train_captions"), CALIBRATION,
                                        model.preprocess, config.batch_size)
        result = sparsify(model, config, loader, seed=seed, progress=ctx.is_main)
    if ctx.is_main:
        _write(result, config, model_name, seed)


def _write(result, config, model_name: str, seed: int) -> None:
    meta = dict(result.meta)
    wall = meta.pop("wall_time_s")
    tensors = {}
    for target, weights in result.weights.items():
        packed, _ = compact_tensors({f"{target_name(target)}/{n}": w for n, w in weights.items()},
                                    [f"{target_name(target)}/{n}" for n in weights])
        tensors.update(packed)
    metadata = {"config": config.as_dict(), "meta": meta, "model": model_name, "seed": seed,
                "targets": [target_name(t) for t in result.weights],
                "shapes": {n: list(w.shape) for n, w in next(iter(result.weights.values())).items()}}
    with commit_together():
        save_safetensors(OUT, tensors, {k: json.dumps(v, sort_keys=True) for k, v in metadata.items()})
        write_json(TIMING, {"wall_time_s": wall, "num_grads_used": meta.get("num_grads_used"),
                            "calibration_passes": meta.get("calibration_passes")})
    print(f"sparse_prune: {config.method} ({config.mask.name}) at {', '.join(metadata['targets'])} in "
          f"{wall:.1f} s; wrote {OUT}")


if __name__ == "__main__":
    run_stage("sparse_prune", main)
