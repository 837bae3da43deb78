"""Stage evaluate: the final model next to the cached dense baseline, into reports/metrics.json.

The dense model's accuracy, complexity and text embeddings come from artifacts/eval/dense/ (stage
evaluate_dense); here the final model (and, when distillation ran, the exported one before it) are
evaluated, the per-step masks when ``evaluate.steps`` is on, and latency is measured pruned vs dense,
interleaved. `evaluate.nproc > 1` relaunches it under torchrun: images and texts are encoded by whole batches
over the processes and gathered in order; rank 0 times the latency and writes the metrics.
"""
import torch

from _common import data_parallel_stage, relaunch, run_stage, stage_paths
from _evaluation import dense_settings_from_params, read_wall_times
from clipprune.config import parse_params
from clipprune.data.evalsets import open_eval_dataset
from clipprune.evaluate.dense import load_dense_evaluation
from clipprune.evaluate.suite import evaluation_report, null_metric_notes, summary_metrics
from clipprune.deploy.onnx_report import read_onnx_report
from clipprune.io import write_json
from clipprune.models import load_model

# every path is named once, on the stage's cmd in dvc.yaml: the dense model's cached evaluation
# (evaluate_dense), the exported model before distillation, the final model (distill; the exported one when
# distillation is off), the scores, the masks of each step, the folder of the stages' timing files
DENSE, PRUNED, FINAL, SCORES, SEARCHED, REARRANGED, TUNED, TIMING, ONNX, OUT = stage_paths(
    "evaluate", "dense", "pruned", "final", "scores", "searched", "rearranged", "tuned", "timing", "onnx", "out",
    main=__name__ == "__main__")
MASKS = {"search": SEARCHED, "rearranged": REARRANGED, "tuned": TUNED}
TIMED_STEPS = ("score", "search", "tune", "distill")


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "evaluate"))
    settings = dense_settings_from_params(p)
    latency = {"latency_batch": p.evaluate.latency.batch_size, "latency_warmup": p.evaluate.latency.warmup,
               "latency_repeats": p.evaluate.latency.repeats}
    steps = p.evaluate.steps
    # the exported model differs from the final one only when distillation ran (no distill section: none)
    distilled = p.distill is not None and p.distill.enabled
    # extra sets (evaluate.datasets) are read and checked before any model runs, so bad paths fail fast
    extra = [open_eval_dataset(spec) for spec in settings.datasets]
    baseline = load_dense_evaluation(DENSE, settings.inputs())
    paths = {"dense": DENSE, "pruned": PRUNED, "final": FINAL, "scores": SCORES, "searched": SEARCHED,
             "rearranged": REARRANGED, "tuned": TUNED, "timing": TIMING, "out": OUT}
    if relaunch("evaluate", p.evaluate.nproc, paths):
        print(f"evaluate: {p.evaluate.nproc} processes finished; metrics in {OUT}")
        return
    torch.manual_seed(settings.seed)
    dense = load_model(settings.model)
    pruned = FINAL.exists()
    with data_parallel_stage() as ctx:
        metrics = evaluation_report(
            dense, baseline, settings.data, final_dir=FINAL if pruned else None,
            before_distill_dir=PRUNED if pruned and distilled else None, mask_files=MASKS, steps=steps,
            pruning_times=read_wall_times(TIMING, TIMED_STEPS), batch_size=settings.batch_size, seed=settings.seed,
            datasets=extra, log=lambda line: print(f"evaluate: {line}") if ctx.is_main else None, **latency)
    if not ctx.is_main:
        return
    metrics["summary"] = summary_metrics(metrics, *_method_and_constraint())
    if pruned and ONNX.is_file():  # the onnx_export stage's check of the final model in ONNX Runtime
        metrics["onnx"] = read_onnx_report(ONNX)
    write_json(OUT, metrics)
    for note in null_metric_notes({key: metrics[key] for key in ("pruned", "steps") if key in metrics}):
        print(f"evaluate: {note}")
    line = f"evaluate: dense top-1 {_top1(metrics['dense'])}"
    if "before_distill" in metrics.get("pruned", {}):
        line += f", pruned top-1 {_top1(metrics['pruned']['before_distill'])} before distillation"
    if "pruned" in metrics:
        line += (f", final top-1 {_top1(metrics['pruned'])} at {metrics['pruned']['kept_mac_fraction']:.3f} "
                 f"of the MACs, latency ratio image {metrics['pruned']['latency_ratio']['image']:.3f} / text "
                 f"{metrics['pruned']['latency_ratio']['text']:.3f}")
    print(f"{line}; metrics in {OUT}")
    for name, result in metrics["dense"].get("datasets", {}).items():
        print(f"evaluate: {name}: {_headline(result)} dense"
              + (f", {_headline(metrics['pruned']['datasets'][name])} pruned" if "pruned" in metrics else ""))


def _method_and_constraint() -> tuple[str, float | None, list[str] | None]:
    """``"<score criterion>+<search method>"``, the constraint and the searched towers, as recorded in the
    artifacts' metadata."""
    from clipprune.models.masks import load_masks
    from clipprune.scoring import load_scores

    if not (FINAL.exists() and SCORES.is_file() and MASKS["search"].is_file()):
        return "dense", None, None
    search_meta = load_masks(MASKS["search"], with_metadata=True)[1]
    criterion = load_scores(SCORES).meta.get("criterion", "unknown")
    towers = search_meta.get("summary", {}).get("towers")
    return (f"{criterion}+{search_meta.get('method', 'unknown')}", search_meta.get("constraint"),
            sorted(towers) if towers is not None else None)


def _headline(result: dict) -> str:
    """Top-1 accuracy of a classification set, or both recall@1 of a retrieval set."""
    if "zeroshot" in result:
        return f"top-1 {result['zeroshot']['acc1']:.4f}"
    r = result["retrieval"]
    return f"R@1 text->image {r['image_retrieval_recall@1']:.4f} image->text {r['text_retrieval_recall@1']:.4f}"


def _top1(metrics: dict) -> str:
    acc = metrics.get("zeroshot", {}).get("acc1")
    return "n/a" if acc is None else f"{acc:.4f}"


if __name__ == "__main__":
    run_stage("evaluate", main)
