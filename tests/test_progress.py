"""Progress bars: a few whole lines in a log, redrawn bars in a terminal (clipprune.progress)."""
import fcntl
import os
import pty
import re
import subprocess
import struct
import sys
import termios
import textwrap

import pytest

from clipprune.errors import ParamError
from clipprune.progress import INTERVAL_ENV, log_interval

# 1000 updates, a postfix change on each (as distillation sets the loss), then a bar updated by hand
WORK = textwrap.dedent("""
    import time
    from clipprune.progress import progress_bar
    bar = progress_bar(range(1000), desc="steps", unit="step")
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4g}")
        time.sleep(0.0005)
    with progress_bar(total=1000, desc="layers", unit="layer") as bar:
        for _ in range(1000):
            bar.update(1)
    for _ in progress_bar(range(1000), desc="silent", enabled=False):
        pass
""")


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != INTERVAL_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return {**env, **extra}


def _run_to_file(tmp_path, **extra) -> str:
    log = tmp_path / "stderr.log"
    with open(log, "wb") as handle:  # a file, not a terminal: what `dvc exp run --queue` or CI gives a stage
        done = subprocess.run([sys.executable, "-c", WORK], stderr=handle, stdout=subprocess.DEVNULL,
                              env=_child_env(**extra), timeout=120)
    assert done.returncode == 0, log.read_text()
    return log.read_text()


def test_a_log_gets_a_start_and_an_end_line_per_bar(tmp_path):
    text = _run_to_file(tmp_path)
    assert "\r" not in text  # no carriage-return redraws: every line is a line
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("steps:")]
    layers = [line for line in lines if line.startswith("layers:")]
    assert len(lines) == len(steps) + len(layers) <= 6  # 2000 updates, 1000 postfix changes
    assert 2 <= len(steps) <= 3 and 2 <= len(layers) <= 3
    assert re.search(r"\b0/1000\b", steps[0]) and re.search(r"\b1000/1000 \[\d+:\d{2}<", steps[-1])
    assert "loss=0.001" in steps[-1]  # the last postfix is in the end line
    assert re.search(r"\b1000/1000\b", layers[-1])
    assert not any("silent" in line for line in lines)


def test_the_interval_can_be_set_for_logs(tmp_path):
    lines = _run_to_file(tmp_path, **{INTERVAL_ENV: "0"}).splitlines()
    # the start, one per update, and the end (whose rate differs from the last update's)
    assert 1001 <= len([line for line in lines if line.startswith("layers:")]) <= 1002


def test_a_terminal_keeps_the_redrawn_bar():
    leader, follower = pty.openpty()
    # a new pseudo-terminal is 0 columns wide, which tqdm would honour with an empty status
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-c", WORK], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=follower, env=_child_env())
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(120) == 0
    finally:
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert text.count("\r") > 10 and "steps:" in text  # tqdm redraws in place, as before


def test_a_bad_interval_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ParamError, match=r"^CLIPPRUNE_PROGRESS_INTERVAL must be a number of seconds >= 0, got 'soon'$"):
        log_interval()
    monkeypatch.setenv(INTERVAL_ENV, "-1")
    with pytest.raises(ParamError):
        log_interval()
    monkeypatch.setenv(INTERVAL_ENV, "12.5")
    assert log_interval() == 12.5
