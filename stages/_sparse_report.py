"""What the stages that end in a weight-sparse model (sparsify@<target>, sparse_gradual) share: write the compact
model, read it back bit for bit, evaluate it against the cached dense evaluation, write its report."""
from __future__ import annotations

from pathlib import Path

import torch

from clipprune.evaluate.complexity import file_size_bytes
from clipprune.evaluate.embeddings import TextEncoder
from clipprune.evaluate.suite import accuracy_metrics, describe_text_reuse
from clipprune.io import staged, write_json
from clipprune.sparsity import load_sparse, save_sparse, sparsity_stats
from clipprune.sparsity.export import check_same_model
from clipprune.sparsity.semi_structured import check_semi_structured


def write_sparse_and_report(stage: str, model, keys, out_dir: Path, extra: dict, weights: dict, mask, baseline,
                            settings, dense_bytes: int, report_path: Path, fields: dict, towers=("vision",)) -> dict:
    """Call inside ``commit_together()``. ``fields`` lead the report; it adds ``sparsity``, ``dense_reference``,
    ``sparse`` (zero-shot / retrieval of the reloaded model) and ``file_bytes``; for a 2:4 mask also
    ``semi_structured`` (the sparse-tensor-core form checked against the masked model on CUDA, or why it was not
    used). Returns the report."""
    save_sparse(model, keys, out_dir, extra)
    reloaded = load_sparse(staged(out_dir))  # read back before it is renamed into place
    check_same_model(reloaded, model, str(out_dir))  # bit-identical, not merely close
    text = TextEncoder(reloaded, settings.batch_size, baseline.text)
    print(f"{stage}: {describe_text_reuse('sparse model', text)}")
    stats = sparsity_stats(weights, (mask.n, mask.m) if mask.kind == "nm" else None)
    compact_bytes = file_size_bytes(staged(out_dir))
    report = {
        **fields,
        "sparsity": stats,
        # not "dense": reports/metrics.json has that block, and equal key paths in several metrics files
        # make `dvc exp show` prefix the column with the file name
        "dense_reference": {key: baseline.metrics[key] for key in ("zeroshot", "retrieval")
                            if key in baseline.metrics},
        "sparse": accuracy_metrics(reloaded, settings.data, batch_size=settings.batch_size, label="sparse model",
                                   text=text),
        "file_bytes": {"compact": compact_bytes, "dense": dense_bytes, "ratio": compact_bytes / dense_bytes},
    }
    if mask.kind == "nm" and (mask.n, mask.m) == (2, 4) and "vision" in towers:
        images = torch.randn(4, 3, reloaded.image_size, reloaded.image_size, generator=torch.Generator().manual_seed(0))
        report["semi_structured"] = check_semi_structured(reloaded, towers, images)
    write_json(report_path, report)
    return report


def top1_text(report: dict) -> str:
    """The sparse model's zero-shot top-1 for a stage's last line (``n/a`` without a classification split)."""
    top1 = report["sparse"].get("zeroshot", {}).get("acc1")
    return "n/a" if top1 is None else f"{top1:.4f}"
