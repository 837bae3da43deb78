"""Stage onnx_export: the final model's encode_image / encode_text as ONNX graphs (dynamic batch), checked in
ONNX Runtime against PyTorch on the evaluation data, and timed against the dense model's graphs.

Writes artifacts/onnx/{image,text}.onnx and reports/onnx.json (max abs differences, allclose at onnx.atol /
onnx.rtol, zero-shot top-1 from ONNX Runtime vs PyTorch embeddings, file sizes, ONNX Runtime latency ratio
pruned/dense interleaved at evaluate.latency). Outputs that disagree beyond the tolerance fail the stage.
"""
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from _common import run_stage, stage_paths
from _evaluation import eval_data_from_params
from clipprune.config import parse_params
from clipprune.data.coco import CocoCaptions, collate_image_captions
from clipprune.data.imagefolder import ImageFolderClassification, load_classnames, load_templates
from clipprune.deploy.onnx_export import (check_onnx, check_outputs_close, export_onnx, file_sizes_mb,
                                          onnx_latency_ratio, sample_inputs)
from clipprune.evaluate.zeroshot import prompt_texts, tokenize_texts
from clipprune.io import commit_together, staged, write_json
from clipprune.models import load_model

# every path is named once, on the stage's cmd in dvc.yaml
FINAL, OUT, REPORT = stage_paths("onnx_export", "final", "out", "report", main=__name__ == "__main__")
MAX_CAPTION_TEXTS = 512  # without a classification split: captions compared (one per image)


def _eval_batches(model, p):
    """(batches of (images, targets or None), prompt tokens, n_classes or None, n_templates)."""
    data, batch = eval_data_from_params(p), p.evaluate.batch_size
    if data.classification is not None:
        classnames, templates = load_classnames(data.classnames), load_templates(data.templates)
        folder = ImageFolderClassification(data.classification, classnames, transform=model.preprocess)
        tokens = tokenize_texts(model, prompt_texts(classnames, templates))
        return DataLoader(folder, batch_size=batch, shuffle=False), tokens, len(classnames), len(templates)
    captions = CocoCaptions(data.retrieval_images, data.retrieval_captions, transform=model.preprocess)
    loader = DataLoader(captions, batch_size=batch, shuffle=False, collate_fn=collate_image_captions)
    texts = [captions.captions(image_id)[0] for image_id in captions.image_ids[:MAX_CAPTION_TEXTS]]
    return ((images, None) for images, _ in loader), tokenize_texts(model, texts), None, 1


def main(params: dict) -> None:
    p = parse_params(params, need=("seed", "model", "data", "evaluate", "onnx"))
    start = time.perf_counter()
    torch.manual_seed(p.seed)
    final = load_model(f"pruned:{FINAL}")
    dense = load_model(p.model)
    latency = p.evaluate.latency
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = export_onnx(dense, Path(tmp) / "dense", p.onnx.opset)["image"].parent  # only timed
        with commit_together():  # graphs and report: all or none
            export_onnx(final, OUT, p.onnx.opset)
            exported = staged(OUT)
            batches, tokens, n_classes, n_templates = _eval_batches(final, p)
            report = check_onnx(final, exported, batches, tokens, n_classes, n_templates, atol=p.onnx.atol,
                                rtol=p.onnx.rtol, batch_size=p.evaluate.batch_size)
            check_outputs_close(report, p.onnx.atol, p.onnx.rtol, str(OUT))
            inputs = {tower: sample_inputs(dense, tower, latency.batch_size, p.seed) for tower in ("image", "text")}
            timed = onnx_latency_ratio(exported, dense_dir, inputs, latency.warmup, latency.repeats)
            sizes, dense_sizes = file_sizes_mb(exported), file_sizes_mb(dense_dir)
            for tower in ("image", "text"):
                report[tower].update(file_mb=sizes[tower], dense_file_mb=dense_sizes[tower],
                                     latency_ratio=timed[tower]["ratio"], same_graph=timed[tower]["same_graph"],
                                     latency_ms={"pruned": timed[tower]["pruned_ms"], "dense": timed[tower]["dense_ms"]})
            report.update(opset=p.onnx.opset, atol=p.onnx.atol, rtol=p.onnx.rtol, provider="CPUExecutionProvider",
                          latency_batch=latency.batch_size, wall_time_s=time.perf_counter() - start)
            write_json(REPORT, report)
    zs = report["zeroshot"]
    print(f"onnx_export: max abs diff image {report['image']['max_abs_diff']:.2g}, text "
          f"{report['text']['max_abs_diff']:.2g}"
          + (f"; top-1 ONNX {zs['top1_onnx']:.4f} vs PyTorch {zs['top1_torch']:.4f}" if zs else "")
          + f"; ONNX Runtime latency ratio image {report['image']['latency_ratio']:.3f}, text "
          f"{report['text']['latency_ratio']:.3f}; wrote {OUT} and {REPORT} in {report['wall_time_s']:.1f} s")


if __name__ == "__main__":
    run_stage("onnx_export", main)
