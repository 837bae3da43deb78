#!/usr/bin/env python
"""Build the embedded default dataset (data/fixtures/digits.zip) from scikit-learn's digits.

The zip is byte-for-byte reproducible for a given seed; pin the printed sha256 in params.yaml.
Usage: python scripts/build_digits_dataset.py [--out data/fixtures/digits.zip] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import clipprune  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from clipprune.data.archive import sha256_file  # noqa: E402
from digits_dataset import archive_entries, digit_records, summarize, write_zip  # noqa: E402
from clipprune.errors import ClipPruneError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "fixtures" / "digits.zip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="keep only the first k images of each class per split (for quick tests)")
    args = parser.parse_args(argv)
    try:
        records = digit_records(args.seed, args.limit_per_class)
        write_zip(args.out, archive_entries(records, args.seed))
    except ClipPruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, stats in summarize(records).items():
        print(f"{split}: {stats['images']} images, {stats['captions']} captions, "
              f"{stats['unique_attribute_tuples']} with a unique (digit, attributes) tuple, "
              f"{stats['mean_images_per_tuple']:.2f} images per tuple on average")
    print(f"wrote {args.out}")
    print(f"size {args.out.stat().st_size} bytes")
    print(f"sha256 {sha256_file(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
