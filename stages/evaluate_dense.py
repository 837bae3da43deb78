"""Stage evaluate_dense: the dense model's evaluation, once, into artifacts/eval/dense/ (a cached DVC out).

Zero-shot classification, retrieval, extra evaluation sets, GMACs / params and the file size of the dense
model, plus its class and caption embeddings (which evaluate reuses for every model whose text tower is
unchanged). It depends on the model, the evaluation data and the evaluate params that change these figures,
not on anything the pruning writes, so a sweep over constraints or criteria evaluates the dense model once.
`evaluate.nproc > 1` relaunches it under torchrun (images and texts sharded by whole batches, rank 0 writes).
"""

import torch

from _common import data_parallel_stage, relaunch, run_stage, stage_paths
from _evaluation import dense_settings_from_params
from clipprune.config import parse_params
from clipprune.data.evalsets import open_eval_dataset
from clipprune.evaluate.dense import save_dense_evaluation
from clipprune.evaluate.suite import evaluate_dense, null_metric_notes
from clipprune.models import load_model

# every path is named once, on the stage's cmd in dvc.yaml
OUT, = stage_paths("evaluate_dense", "out", main=__name__ == "__main__")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "evaluate"))
    settings = dense_settings_from_params(p)
    # extra sets (evaluate.datasets) are read and checked before the model runs, so bad paths fail fast
    extra = [open_eval_dataset(spec) for spec in settings.datasets]
    if relaunch("evaluate_dense", p.evaluate.nproc, {"out": OUT}):
        print(f"evaluate_dense: {p.evaluate.nproc} processes finished; wrote {OUT}")
        return
    torch.manual_seed(settings.seed)
    model = load_model(settings.model)
    with data_parallel_stage() as ctx:
        evaluation = evaluate_dense(model, settings.data, inputs=settings.inputs(), batch_size=settings.batch_size,
                                    datasets=extra)
    if not ctx.is_main:
        return
    save_dense_evaluation(OUT, evaluation)
    acc = evaluation.metrics.get("zeroshot", {}).get("acc1")
    retrieval = evaluation.metrics["retrieval"]
    print(f"evaluate_dense: {settings.model}: top-1 {'n/a' if acc is None else f'{acc:.4f}'}, R@1 text->image "
          f"{retrieval['image_retrieval_recall@1']:.4f} image->text {retrieval['text_retrieval_recall@1']:.4f}; "
          f"{len(evaluation.text.entries)} text embedding sets (fingerprint "
          f"{(evaluation.text.fingerprint or 'none')[:12]}); wrote {OUT}")
    for note in null_metric_notes(evaluation.metrics, "dense"):
        print(f"evaluate_dense: {note}")


if __name__ == "__main__":
    run_stage("evaluate_dense", main)
