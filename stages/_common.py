"""Shared entry-point wrapper for stages: params loading, one-line errors, exit codes."""
from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from typing import Callable

from clipprune.errors import ClipPruneError
from clipprune.params import load_params


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so that atomic writes in progress remove their temporaries."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_stage(name: str, main: Callable[[dict], None], params_path: str = "params.yaml") -> None:
    """Run ``main(params)``; user errors print one line and exit 1, anything else exits 2 with a traceback.

    SIGINT (exit 130) and SIGTERM (exit 143) unwind the stage like an exception, so no temporary is left.
    """
    start = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main(load_params(params_path))
    except ClipPruneError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted; no outputs were written", file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except Exception:  # a bug, not bad input: keep the traceback for the report
        traceback.print_exc()
        sys.exit(2)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    print(f"{name}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
