"""Helpers for end-to-end tests: a throwaway copy of the repo in which DVC commands run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_files() -> list[str]:
    """Tracked files plus untracked files git does not ignore (what a commit of the work tree holds)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line and (REPO / line).is_file()]


def copy_repo(dest: Path) -> Path:
    """Copy the work tree into ``dest`` as a fresh git repo with one commit."""
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy")
    return dest


def env() -> dict:
    """Environment in which `python` and `dvc` are this interpreter's venv, offline, one BLAS thread."""
    bindir = str(Path(sys.executable).parent)
    e = dict(os.environ)
    e["PATH"] = bindir + os.pathsep + e.get("PATH", "")
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test",
             GIT_AUTHOR_EMAIL="test@localhost", GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    return e


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env()).stdout


def dvc(cwd: Path, *args: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run `dvc <args>` in ``cwd``; on failure (when ``check``) the assertion shows its output."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          env=env(), timeout=timeout)
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def stage(cwd: Path, name: str, *args: str, timeout: int = 900, environment: dict | None = None
          ) -> subprocess.CompletedProcess:
    """Run ``stages/<name>.py [args]`` as `python stages/<name>.py` would (see :func:`run_script`)."""
    return run_script(cwd, [f"stages/{name}.py", *args], environment=environment, timeout=timeout)


# ---------------------------------------------------------------- fast stage runs

# Importing torch, open_clip and transformers costs a stage process 3-8 s, more than most bad-input cases
# run. A "zygote" imports them once; each run is a child forked from it that executes the script as
# `python <script>` would (same argv, sys.path[0], cwd, environment, exit status, stdout/stderr). Only
# environments that agree with the zygote's on what those libraries read at import time are served by it.
_IMPORT_TIME_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_OFFLINE",
                    "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE")
_PRELOAD = ("numpy", "torch", "PIL.Image", "safetensors.torch", "open_clip", "transformers", "tqdm",
            "ruamel.yaml", "matplotlib")
_ZYGOTE = r"""
import json, os, runpy, sys, traceback
import matplotlib
matplotlib.use("Agg")
for name in sys.argv[1:]:
    __import__(name)
answer = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.argv = list(request["argv"])
            sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as exit:
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    answer.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    answer.flush()
"""


class _Zygote:
    def __init__(self, environment: dict):
        self.key = _import_key(environment)
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, *_PRELOAD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=environment, cwd=REPO)

    def close(self) -> None:
        self.proc.stdin.close()  # the zygote's loop ends at end of input
        self.proc.wait(30)

    def run(self, cwd: Path, argv: list[str], environment: dict, timeout: float) -> subprocess.CompletedProcess:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"cwd": str(cwd), "argv": argv, "env": environment, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = _readline(self.proc, timeout)
            return subprocess.CompletedProcess([sys.executable, *argv], json.loads(reply),
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise subprocess.TimeoutExpired(proc.args, timeout)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the stage zygote died")
    return line


def _import_key(environment: dict) -> tuple:
    return tuple(environment.get(name) for name in _IMPORT_TIME_ENV)


_IDLE: list[_Zygote] = []
_IDLE_LOCK = threading.Lock()


def run_script(cwd: Path, argv: list[str], *, environment: dict | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python <argv>`` in ``cwd`` (stdout/stderr captured as text), through a zygote when possible.

    Set CLIPPRUNE_TEST_NO_ZYGOTE=1 to run every script as a plain subprocess.
    """
    environment = env() if environment is None else environment
    if os.environ.get("CLIPPRUNE_TEST_NO_ZYGOTE") or not hasattr(os, "fork"):
        return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                              env=environment, timeout=timeout)
    key = _import_key(environment)
    with _IDLE_LOCK:  # concurrent callers (threads) each take a zygote of their own
        zygote = next((z for z in _IDLE if z.key == key and z.proc.poll() is None), None)
        if zygote is not None:
            _IDLE.remove(zygote)
        if zygote is None:  # an environment of its own: the zygotes of other environments are not reused
            for other in [z for z in _IDLE if z.key != key]:
                _IDLE.remove(other)
                other.close()
    zygote = zygote or _Zygote(environment)
    result = zygote.run(cwd, argv, environment, timeout)
    with _IDLE_LOCK:
        _IDLE.append(zygote)
    return result


DELETE = object()  # set_key(..., DELETE) removes the key


def set_key(params: dict, dotted: str, value) -> None:
    """Set the nested params key ``dotted`` ("section.key") to ``value``, or remove it for ``DELETE``."""
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
