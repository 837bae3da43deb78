"""Shared entry-point wrapper for stages: params loading, one-line errors, exit codes."""
from __future__ import annotations

import sys
import time
import traceback
from typing import Callable

from clipprune.errors import ClipPruneError
from clipprune.params import load_params


def run_stage(name: str, main: Callable[[dict], None], params_path: str = "params.yaml") -> None:
    """Run ``main(params)``; user errors print one line and exit 1, anything else exits 2 with a traceback."""
    start = time.perf_counter()
    try:
        main(load_params(params_path))
    except ClipPruneError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; no outputs were written", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug, not bad input: keep the traceback for the report
        traceback.print_exc()
        sys.exit(2)
    print(f"{name}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
