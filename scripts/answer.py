"""What `make repro` ends with: the dense and the final model side by side, in a few aligned lines.

    python scripts/answer.py [--summary reports/summary.json] [--metrics reports/metrics.json]

Final-model figures come from reports/summary.json (stage summary), the dense model's from
reports/metrics.json (stage evaluate); a figure this run did not compute shows as "–". Ends with the path of
the full report (reports/summary.md). Exit status 1 (one line) when a file is missing or not JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DASH = "–"


def _get(document: dict, path: str):
    for key in path.split("."):
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


def _fmt(value, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def _scaled(value, factor: float):
    return None if value is None else value * factor


def answer_rows(summary: dict, metrics: dict) -> list[tuple[str, str, str]]:
    """(figure, dense, final) rows; ``summary`` is summary.json's ``summary`` block, ``metrics`` metrics.json."""
    dense = metrics.get("dense", {})
    ratio = (f"{_fmt(summary.get('latency_ratio_image'), '.3f')} / {_fmt(summary.get('latency_ratio_text'), '.3f')}")
    pruned = summary.get("mac_pct") is not None
    return [
        ("zero-shot top-1 (%)", _fmt(_scaled(_get(dense, "zeroshot.acc1"), 100), ".2f"), _fmt(summary.get("top1"), ".2f")),
        ("R@1 text→image (%)", _fmt(_scaled(_get(dense, "retrieval.image_retrieval_recall@1"), 100), ".2f"),
         _fmt(summary.get("r1_t2i"), ".2f")),
        ("R@1 image→text (%)", _fmt(_scaled(_get(dense, "retrieval.text_retrieval_recall@1"), 100), ".2f"),
         _fmt(summary.get("r1_i2t"), ".2f")),
        ("kept MACs (%)", "100.0", _fmt(summary.get("mac_pct"), ".1f")),
        ("params (M)", _fmt(_scaled(_get(dense, "complexity.params"), 1e-6), ".3f"), _fmt(summary.get("params_m"), ".3f")),
        ("file size (MB)", _fmt(metrics.get("dense_file_mb"), ".2f"), _fmt(summary.get("file_mb"), ".2f")),
        ("latency ratio image / text", "1 / 1", ratio if pruned else DASH),
        ("pruning wall time (s)", DASH, _fmt(summary.get("pruning_time_s"), ".1f")),
        ("distillation wall time (s)", DASH, _fmt(summary.get("distill_time_s"), ".1f")),
    ]


def format_answer(summary: dict, metrics: dict, report: str = "reports/summary.md") -> str:
    """The lines `make repro` prints: a title, the aligned table, the path of the full report."""
    method, constraint = summary.get("method"), summary.get("constraint")
    title = f"{method or 'dense'}" + (f" at constraint {constraint}" if constraint is not None else "")
    rows = [("", "dense", "final"), *answer_rows(summary, metrics)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [title]
    for row in rows:
        lines.append(f"  {row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  {row[2].rjust(widths[2])}".rstrip())
    lines.append(f"full report: {report}")
    return "\n".join(lines)


def _load(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"answer: error: {path} not found (run `dvc repro` first)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"answer: error: {path} is not valid JSON ({type(err).__name__})") from None
    if not isinstance(document, dict):
        raise SystemExit(f"answer: error: {path}: expected a JSON object")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, default=Path("reports/summary.json"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--report", default="reports/summary.md", help="path printed as the full report")
    args = parser.parse_args(argv)
    summary = _load(args.summary).get("summary", {})
    print(format_answer(summary, _load(args.metrics), args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
