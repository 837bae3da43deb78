"""Queue a grid of DVC experiments (constraints × methods), run them, and print one comparison table.

    python scripts/sweep.py --constraints 0.3,0.5,0.7 --criteria fisher,magnitude --searches mac
    python scripts/sweep.py --set tune.lsq=true,false --constraints 0.5     # any other param as a grid axis
    python scripts/sweep.py --show                                           # only the table of existing runs

The grid is queued with one `dvc exp run --queue -S key=v1,v2 ...` (DVC expands comma lists into their
cross product), run with `dvc exp run --run-all -j N` (temporary copies, so the workspace is untouched),
then the columns that matter are read from `dvc exp show --csv` (the `summary.*` block of
reports/summary.json, the pipeline's only metrics file, written by the last stage, summary) and printed as a table. Run it from the repository root with the
venv's `dvc` on PATH (`make sweep` does both). Exit status 1 when an experiment of the grid failed.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
from pathlib import Path

# (column title, `dvc exp show --csv` column, format) of the table
COLUMNS = (
    ("experiment", "Experiment", "{}"),
    ("method", "summary.method", "{}"),
    ("constraint", "summary.constraint", "{:.2f}"),
    ("MAC %", "summary.mac_pct", "{:.1f}"),
    ("params M", "summary.params_m", "{:.3f}"),
    ("top-1 %", "summary.top1", "{:.2f}"),
    ("R@1 t→i %", "summary.r1_t2i", "{:.2f}"),
    ("R@1 i→t %", "summary.r1_i2t", "{:.2f}"),
    ("latency img", "summary.latency_ratio_image", "{:.3f}"),
    ("latency txt", "summary.latency_ratio_text", "{:.3f}"),
    ("pruning s", "summary.pruning_time_s", "{:.1f}"),
)
_QUEUED = re.compile(r"Queued experiment '([^']+)'")


def _dvc(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], capture_output=capture, text=True)


def grid_args(constraints: str | None, criteria: str | None, searches: str | None, extra: list[str]) -> list[str]:
    """``-S key=v1,v2`` arguments of the grid (each axis a comma list; DVC takes their cross product)."""
    axes = []
    for key, values in (("search.constraint", constraints), ("score.criterion", criteria),
                        ("search.method", searches)):
        if values:
            axes.append(f"{key}={values}")
    for item in extra:
        if "=" not in item or not item.split("=", 1)[1]:
            raise SystemExit(f"sweep: error: --set expects key=v1,v2,..., got {item!r}")
        axes.append(item)
    if not axes:
        raise SystemExit("sweep: error: give at least one axis (--constraints, --criteria, --searches or --set)")
    return [arg for axis in axes for arg in ("-S", axis)]


def queue_grid(args: list[str], targets: list[str] | None = None) -> list[str]:
    """Queue the grid (for ``targets`` only, or the whole pipeline); returns the names DVC gave the runs."""
    proc = _dvc("exp", "run", "--queue", *args, *(targets or []))
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"sweep: error: `dvc exp run --queue {' '.join(args)}` failed (exit {proc.returncode})")
    return _QUEUED.findall(proc.stdout + proc.stderr)


def run_queue(jobs: int) -> None:
    """Run every queued experiment (`dvc exp run --run-all`), following their logs until all have finished."""
    proc = _dvc("exp", "run", "--run-all", "-j", str(jobs), capture=False)
    if proc.returncode != 0:
        raise SystemExit(f"sweep: error: `dvc exp run --run-all` failed (exit {proc.returncode})")


SUMMARY_FILE = "reports/summary.json"


def plain_columns(row: dict) -> dict:
    """A row with summary.json's columns under their own names: when another metrics file of an older commit
    has the same key, `dvc exp show` names both ``<file>:<key>``; summary.json's wins, the others are dropped."""
    out = {key: value for key, value in row.items() if ":" not in key or key.startswith(("http:", "https:"))}
    for key, value in row.items():
        file, _, name = key.partition(":")
        if file == SUMMARY_FILE:
            out[name] = value
    return out


def exp_rows(all_commits: bool = False) -> list[dict]:
    """Rows of `dvc exp show --csv` (workspace, baseline and every experiment; with ``all_commits`` the
    experiments of earlier commits too), columns named as in :func:`plain_columns`."""
    args = ["exp", "show", "--csv", *(["--all-commits"] if all_commits else [])]
    proc = _dvc(*args)
    if proc.returncode != 0:
        raise SystemExit(f"sweep: error: `dvc {' '.join(args)}` failed: {proc.stderr.strip()}")
    return [plain_columns(row) for row in csv.DictReader(io.StringIO(proc.stdout))]


def _cell(row: dict, column: str, fmt: str) -> str:
    value = row.get(column, "")
    if value in ("", "-", None):
        return "–"
    try:
        return fmt.format(float(value)) if fmt != "{}" else value
    except ValueError:
        return value


def tidy_table(rows: list[dict], names: list[str] | None = None) -> list[list[str]]:
    """Header + one line per run (only ``names`` when given), sorted by method then constraint."""
    chosen = [r for r in rows if names is None or r.get("Experiment") in names]
    chosen = [r for r in chosen if r.get("summary.method") not in (None, "", "-")]
    chosen.sort(key=lambda r: (r.get("summary.method", ""), float(r.get("summary.constraint") or 0)))
    label = {r.get("Experiment") or r.get("rev", ""): r for r in chosen}
    table = [[title for title, _, _ in COLUMNS]]
    for name, row in label.items():
        table.append([name or row.get("rev", "")] + [_cell(row, col, fmt) for _, col, fmt in COLUMNS[1:]])
    return table


def format_table(table: list[list[str]]) -> str:
    """Markdown-style table with aligned columns."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--constraints", help="search.constraint values, comma separated (e.g. 0.3,0.5,0.7)")
    parser.add_argument("--criteria", help="score.criterion values, comma separated (e.g. fisher,magnitude)")
    parser.add_argument("--searches", help="search.method values, comma separated (e.g. mac,uniform)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="another grid axis (repeatable), passed to dvc as -S KEY=V1,V2")
    parser.add_argument("--target", action="append", default=[], metavar="STAGE",
                        help="reproduce only this stage and what it depends on (repeatable; default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)")
    parser.add_argument("--queue-only", action="store_true", help="queue the grid, do not run it")
    parser.add_argument("--show", action="store_true", help="only print the table of all existing experiments")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV to this file")
    args = parser.parse_args(argv)

    names = None
    if not args.show:
        names = queue_grid(grid_args(args.constraints, args.criteria, args.searches, args.set), args.target)
        print(f"sweep: queued {len(names)} experiments: {', '.join(names)}")
        if args.queue_only:
            print("sweep: run them with `dvc exp run --run-all -j 1` (or `dvc queue start -j 1`)")
            return 0
        run_queue(args.jobs)
    rows = exp_rows()
    table = tidy_table(rows, names)
    print(format_table(table))
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            csv.writer(handle).writerows(table)
    if names is not None:
        missing = sorted(set(names) - {line[0] for line in table[1:]})
        if missing:
            print(f"sweep: error: {len(missing)} experiment(s) failed: {', '.join(missing)} "
                  f"(see `dvc queue logs <name>`)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
