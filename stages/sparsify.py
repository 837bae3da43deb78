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
from _sparse_report import top1_text, write_sparse_and_report
from clipprune.config import parse_params
from clipprune.errors import ClipPruneError, ParamError
from clipprune.evaluate.dense import load_dense_evaluation
from clipprune.io import commit_together
from clipprune.models import load_model
from clipprune.scoring import available_losses
from clipprune.sparsity import apply_weights, available_methods, check_target, sparsity_config, target_name
from clipprune.sparsity.export import dense_size_bytes, read_target

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
    torch.manual_seed(p.seed)
    model = load_model(model_name)
    dense_bytes = dense_size_bytes(model)
    apply_weights(model, weights, config.towers)
    keys = [meta["meta"]["state_keys"][layer] for layer in weights]
    mask = config.mask
    fields = {"target": target, "method": config.method, "mask_type": mask.name,
              "target_applies": mask.kind != "nm"}  # N:M fixes the sparsity at (M-N)/M whatever the target
    with commit_together():  # the compact model and its report: both or neither
        report = write_sparse_and_report(
            "sparsify", model, keys, out_dir, {"sparsity": {"target": target, "method": config.method,
                                                            "mask_type": mask.name}},
            weights, mask, baseline, settings, dense_bytes, report_path,
            {**fields, "method_meta": {k: v for k, v in meta["meta"].items() if k not in ("layers", "state_keys")}},
            config.towers)
    stats, compact_bytes = report["sparsity"], report["file_bytes"]["compact"]
    print(f"sparsify: {config.method} {mask.name} at {stats['overall']:.4f} sparsity: top-1 "
          f"{top1_text(report)}; {compact_bytes / 1e6:.2f} MB vs {dense_bytes / 1e6:.2f} "
          f"MB dense; wrote {out_dir}")


if __name__ == "__main__":
    run_stage("sparsify", main)
