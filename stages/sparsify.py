"""Stage sparsify@<target>: export one target's sparse model compactly and evaluate it.

Usage: python stages/sparsify.py <target>. Reads artifacts/sparse/pruned.safetensors (stage sparse_prune),
writes artifacts/sparse/<target>/ (bitmask + values, ``clipprune.sparsity.load_sparse``) and
reports/sparsity/<target>.json (sparsity per layer and overall, zero-shot and retrieval of the dense and
the sparse model, file size compact vs dense).
"""
import json
import sys
from pathlib import Path

import torch

from _common import run_stage
from clipprune.errors import ClipPruneError, ParamError
from clipprune.evaluate.complexity import file_size_bytes
from clipprune.evaluate.suite import accuracy_metrics
from clipprune.io import write_json
from clipprune.models import load_model
from clipprune.params import get, get_int, get_str
from clipprune.sparsity import (apply_weights, available_methods, check_target, load_sparse, parse_config,
                                save_sparse, sparsity_stats, target_name)
from clipprune.sparsity.export import dense_size_bytes, expand_tensors

PRUNED = Path("artifacts/sparse/pruned.safetensors")


def read_target(path: Path, name: str) -> tuple[dict, dict]:
    """(``{layer: weight}`` of one target, the file's metadata)."""
    from safetensors import safe_open

    if not path.is_file():
        raise ClipPruneError(f"{path}: not found (run the sparse_prune stage)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            prefix = f"{name}/"
            tensors = {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ClipPruneError(f"{path}: not a readable sparse_prune output ({err})") from err
    if name not in meta.get("targets", []):
        raise ClipPruneError(f"{path}: holds targets {meta.get('targets')}, not {name} (rerun sparse_prune)")
    sparse = {layer: {"shape": shape, "dtype": "float32"} for layer, shape in meta["shapes"].items()}
    return expand_tensors(tensors, sparse, str(path)), meta


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != +0.0 and NaN == the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def main(params: dict) -> None:
    if len(sys.argv) != 2:
        raise ParamError("sparsify: expected one argument, the target sparsity (an item of sparsity.targets)")
    try:
        target = check_target(float(sys.argv[1]), "sparsify target")
    except ValueError:
        raise ParamError(f"sparsify target must be a number in (0, 1), got {sys.argv[1]!r}") from None
    config = parse_config(get(params, "sparsity"), available_methods())
    if target not in config.targets:
        raise ParamError(f"sparsify target {target} is not in sparsity.targets {list(config.targets)}")
    name = target_name(target)
    weights, meta = read_target(PRUNED, name)
    model_name = get_str(params, "model")
    if meta.get("model") != model_name or meta.get("config") != config.as_dict():
        raise ClipPruneError(f"{PRUNED}: written for other params (model or sparsity); rerun sparse_prune")
    from evaluate import eval_data  # stages/evaluate.py: the evaluation data from params

    data = eval_data(params)
    batch_size = get_int(params, "evaluate.batch_size", min_value=1)
    torch.manual_seed(get_int(params, "seed", min_value=0))
    model = load_model(model_name)
    dense_metrics = accuracy_metrics(model, data, batch_size=batch_size)
    dense_bytes = dense_size_bytes(model)
    apply_weights(model, weights, config.towers)
    keys = [meta["meta"]["state_keys"][layer] for layer in weights]
    out_dir = Path("artifacts/sparse") / name
    save_sparse(model, keys, out_dir, {"sparsity": {"target": target, "method": config.method,
                                                    "mask_type": config.mask.name}})
    reloaded = load_sparse(out_dir)
    original = model.module.state_dict()
    for key, value in reloaded.module.state_dict().items():  # bit-identical, not merely close
        if not same_bits(value, original[key]):
            raise ClipPruneError(f"{out_dir}: reloaded tensor {key} differs from the sparse model")
    mask = config.mask
    stats = sparsity_stats(weights, (mask.n, mask.m) if mask.kind == "nm" else None)
    compact_bytes = file_size_bytes(out_dir)
    report = {
        "target": target, "method": config.method, "mask_type": mask.name,
        "target_applies": mask.kind != "nm",  # N:M fixes the sparsity at (M-N)/M whatever the target
        "sparsity": stats,
        "dense": dense_metrics,
        "sparse": accuracy_metrics(reloaded, data, batch_size=batch_size),
        "file_bytes": {"compact": compact_bytes, "dense": dense_bytes, "ratio": compact_bytes / dense_bytes},
        "method_meta": {k: v for k, v in meta["meta"].items() if k not in ("layers", "state_keys")},
    }
    write_json(Path("reports/sparsity") / f"{name}.json", report)
    top1 = report["sparse"].get("zeroshot", {}).get("acc1")
    print(f"sparsify: {config.method} {mask.name} at {stats['overall']:.4f} sparsity: top-1 "
          f"{'n/a' if top1 is None else f'{top1:.4f}'}; {compact_bytes / 1e6:.2f} MB vs {dense_bytes / 1e6:.2f} "
          f"MB dense; wrote {out_dir}")


if __name__ == "__main__":
    run_stage("sparsify", main)
