"""Progress bars that read well both in a terminal and in a log file.

Every progress bar of the library comes from ``progress_bar``. When stderr is a terminal it is a plain
tqdm bar, redrawn in place. When it is not (``dvc repro`` in CI, ``dvc exp run --queue``, ``2> log``),
each carriage-return redraw would become a line of the log (hundreds per stage), so the bar instead prints
whole lines, at most one per ``LOG_INTERVAL_S`` seconds: its start, its state every half minute on long
runs, and its end (with the elapsed time) — a few lines per stage. The environment variable
``CLIPPRUNE_PROGRESS_INTERVAL`` (seconds, ≥ 0) changes that interval (0: a line per update).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Iterable

from tqdm import tqdm as _plain_tqdm

__all__ = ["progress_bar", "LOG_INTERVAL_S", "INTERVAL_ENV", "log_interval", "stderr_is_terminal"]

LOG_INTERVAL_S = 30.0  # in a log: at most one progress line per bar every half minute
INTERVAL_ENV = "CLIPPRUNE_PROGRESS_INTERVAL"


def log_interval() -> float:
    """Seconds between progress lines in a log: ``CLIPPRUNE_PROGRESS_INTERVAL`` if set, else ``LOG_INTERVAL_S``."""
    from .errors import ParamError

    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return LOG_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ParamError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class _LineWriter:
    """File-like target for tqdm that turns its carriage-return redraws into whole lines.

    tqdm writes ``"\\r" + status + padding`` to redraw and ``"\\n"`` or ``"\\r"`` when it closes; each
    non-blank status becomes one line, and a status equal to the previous one is not repeated.
    """

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text: str) -> None:
        for piece in text.replace("\n", "\r").split("\r"):
            status = piece.rstrip()
            if status and status != self.last:
                self.stream.write(status + "\n")
                self.last = status

    def flush(self) -> None:
        self.stream.flush()


class _LogTqdm(_plain_tqdm):
    """tqdm for a log: whole lines, time-throttled, kept at the end (so the log shows the elapsed time)."""

    def __init__(self, *args, interval: float = LOG_INTERVAL_S, **kwargs):
        # maxinterval too: tqdm's monitor thread would otherwise redraw a slow bar every 10 s
        kwargs.update(file=_LineWriter(kwargs.get("file") or sys.stderr), mininterval=interval,
                      maxinterval=max(interval, 0.1), leave=True, ascii=True)
        if interval == 0:
            kwargs.update(miniters=1)
        super().__init__(*args, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        # a postfix change (e.g. the loss of every step) must not print a line: it shows at the next one
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None,
                 enabled: bool = True, **kwargs) -> _plain_tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand with ``total``); ``enabled=False``: silent.

    Other keyword arguments (``unit``, ``unit_scale``, ``leave``, ...) go to tqdm. On a terminal the bar
    is ``tqdm.auto``'s; otherwise it writes whole lines at most every ``log_interval()`` seconds.
    """
    if not enabled:
        return _plain_tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    if stderr_is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, **kwargs)
    return _LogTqdm(iterable, desc=desc, total=total, interval=log_interval(), **kwargs)
