"""Helpers for end-to-end tests: a throwaway copy of the repo in which DVC commands run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def stage(cwd: Path, name: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one stage script directly (as dvc would) and return the finished process."""
    return subprocess.run([sys.executable, f"stages/{name}.py"], cwd=cwd, capture_output=True, text=True,
                          env=env(), timeout=timeout)
