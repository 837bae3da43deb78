"""Stage sparsify@<target>: export one target's sparse model compactly and evaluate it.

Usage (dvc.yaml fills in the target and the paths): python stages/sparsify.py --target T --weights
artifacts/sparse/pruned.safetensors --dense artifacts/eval/dense --out artifacts/sparse/T --report
reports/sparsity/T.json. Reads the sparse weights of every target (stage sparse_prune), writes the compact
model (bitmask + values, ``clipprune.sparsity.load_sparse``) and its report (sparsity per layer and overall,
zero-shot and retrieval of the dense and the sparse model, file size compact vs dense). The dense figures and text embeddings come from the cached
dense evaluation (artifacts/eval/dense, stage evaluate_dense): a sparse model whose text tower was not
pruned takes the dense class and caption embeddings instead of encoding them again.
"""
import torch

from _common import run_stage, stage_paths
from _evaluation import dense_settings_from_params
from clipprune.config import parse_params
from clipprune.errors import ClipPruneError, ParamError
from clipprune.evaluate.complexity import file_size_bytes
from clipprune.evaluate.dense import load_dense_evaluation
from clipprune.evaluate.embeddings import TextEncoder
from clipprune.evaluate.suite import accuracy_metrics, describe_text_reuse
from clipprune.io import commit_together, staged, write_json
from clipprune.models import load_model
from clipprune.scoring import available_losses
from clipprune.sparsity import (apply_weights, available_methods, check_target, load_sparse, save_sparse,
                                sparsity_config, sparsity_stats, target_name)
from clipprune.sparsity.export import check_same_model, dense_size_bytes, read_target

# the target and every path come from the stage's cmd in dvc.yaml (a foreach stage: one per target, so they are
# read when the stage runs, not at import); "dense" is the dense model's cached evaluation (stage evaluate_dense)
OPTIONS = ("target:str", "weights", "dense", "out", "report")


def main(params: dict) -> None:
    target_arg, weights_path, dense_dir, out_dir, report_path = stage_paths("sparsify", *OPTIONS, main=True)
    try:
        target = check_target(float(target_arg), "sparsify --target")
    except ValueError:
        raise ParamError(f"sparsify --target must be a number in (0, 1), got {target_arg!r}") from None
    p = parse_params(params, need=("seed", "model", "data", "sparsity", "evaluate"),
                     choices={"sparsity.method": available_methods(), "sparsity.loss": available_losses()})
    config = sparsity_config(p.sparsity)
    if target not in config.targets:
        raise ParamError(f"sparsify target {target} is not in sparsity.targets {list(config.targets)}")
    name = target_name(target)
    weights, meta = read_target(weights_path, name)
    model_name = p.model
    if meta.get("model") != model_name or meta.get("config") != config.as_dict():
        raise ClipPruneError(f"{weights_path}: written for other params (model or sparsity); rerun sparse_prune")
    settings = dense_settings_from_params(p)
    baseline = load_dense_evaluation(dense_dir, settings.inputs())
    data, batch_size = settings.data, settings.batch_size
    torch.manual_seed(p.seed)
    model = load_model(model_name)
    dense_bytes = dense_size_bytes(model)
    apply_weights(model, weights, config.towers)
    keys = [meta["meta"]["state_keys"][layer] for layer in weights]
    with commit_together():  # the compact model and its report: both or neither
        save_sparse(model, keys, out_dir, {"sparsity": {"target": target, "method": config.method,
                                                        "mask_type": config.mask.name}})
        reloaded = load_sparse(staged(out_dir))  # read back before it is renamed into place
        check_same_model(reloaded, model, str(out_dir))  # bit-identical, not merely close
        text = TextEncoder(reloaded, batch_size, baseline.text)
        print(f"sparsify: {describe_text_reuse('sparse model', text)}")
        mask = config.mask
        stats = sparsity_stats(weights, (mask.n, mask.m) if mask.kind == "nm" else None)
        compact_bytes = file_size_bytes(staged(out_dir))
        report = {
            "target": target, "method": config.method, "mask_type": mask.name,
            "target_applies": mask.kind != "nm",  # N:M fixes the sparsity at (M-N)/M whatever the target
            "sparsity": stats,
            # not "dense": reports/metrics.json has that block, and equal key paths in several metrics files
            # make `dvc exp show` prefix the column with the file name
            "dense_reference": {key: baseline.metrics[key] for key in ("zeroshot", "retrieval")
                                if key in baseline.metrics},
            "sparse": accuracy_metrics(reloaded, data, batch_size=batch_size, label="sparse model", text=text),
            "file_bytes": {"compact": compact_bytes, "dense": dense_bytes, "ratio": compact_bytes / dense_bytes},
            "method_meta": {k: v for k, v in meta["meta"].items() if k not in ("layers", "state_keys")},
        }
        write_json(report_path, report)
    top1 = report["sparse"].get("zeroshot", {}).get("acc1")
    print(f"sparsify: {config.method} {mask.name} at {stats['overall']:.4f} sparsity: top-1 "
          f"{'n/a' if top1 is None else f'{top1:.4f}'}; {compact_bytes / 1e6:.2f} MB vs {dense_bytes / 1e6:.2f} "
          f"MB dense; wrote {out_dir}")


if __name__ == "__main__":
    run_stage("sparsify", main)
