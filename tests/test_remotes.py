"""DVC remotes: push a reproduced pipeline, `git clone` + `dvc pull` elsewhere, get the same bits back.

Three remotes, one small pipeline (64 calibration pairs, cheap evaluate) reproduced once per module in a
throwaway copy of the repo: (a) a local directory, (b) an S3-compatible server (moto) started by the test on
127.0.0.1 with fake credentials, (c) an S3 endpoint on a closed local port, which must fail loudly and leave
the workspace as it was. Nothing but 127.0.0.1 is contacted (instance-metadata lookups are disabled and
credentials come from the environment / `.dvc/config.local`).
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_utils import copy_repo, dvc, env, git

pytestmark = pytest.mark.slow

BUCKET = "clipprune-test"
TARGET = "report"  # the main chain, download → report (side branches such as sparsify are not needed here)
WITH_DEPS = (TARGET, "--with-deps")  # push / pull the outs of that chain (side branches never ran)


def tracked_outs(root: Path) -> list[str]:
    """Paths of every out recorded in ``dvc.lock``: what a remote stores and a pull restores."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def cached_outs(root: Path) -> list[str]:
    """The outs that live only in the DVC cache / remote (not in git): what a pull has to bring."""
    in_git = set(git(root, "ls-files").splitlines())
    return [rel for rel in tracked_outs(root)
            if rel not in in_git and not any(f.startswith(rel + "/") for f in in_git)]


def digest(root: Path, outs: list[str] | None = None) -> dict[str, str]:
    """Relative path -> sha256 of every file of the pipeline's outs (those of ``root``'s dvc.lock by default)."""
    out = {}
    for rel in outs if outs is not None else tracked_outs(root):
        base = root / rel
        for path in sorted([base] if base.is_file() else base.rglob("*")):
            if path.is_file():
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def free_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message, "--allow-empty")


def clone(repo: Path, dest: Path) -> Path:
    git(repo.parent, "clone", "-q", str(repo), str(dest))
    return dest


def assert_up_to_date(repo: Path) -> None:
    status = dvc(repo, "status", "--with-deps", TARGET)
    assert "up to date" in status.stdout, status.stdout
    again = dvc(repo, "repro", TARGET)
    assert "Running stage" not in again.stdout, again.stdout


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A committed copy of the repo with the small pipeline reproduced (its outs only in the local cache)."""
    repo = copy_repo(tmp_path_factory.mktemp("remotes") / "origin")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["calibrate"]["num_samples"] = 32  # one score batch: the remotes, not the pruning, are under test
    params["data"]["layout"]["classification"] = None  # evaluate only retrieval, on 50 images
    params["evaluate"]["max_retrieval_images"] = 50
    params["evaluate"]["latency"] = {"batch_size": 4, "warmup": 0, "repeats": 1}
    if "distill" in params:  # optional retraining: not what is under test here
        params["distill"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", TARGET)
    commit_all(repo, "small pipeline reproduced")
    files = digest(repo)
    assert any(f.startswith("artifacts/models/pruned/") for f in files)
    assert any(f.startswith("artifacts/masks/") for f in files)
    return repo


@pytest.fixture
def offline_aws(monkeypatch, tmp_path):
    """AWS settings that keep boto on 127.0.0.1: fake keys, no metadata service, no user config files."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port) with one empty bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def test_local_directory_remote_round_trip(pipeline, tmp_path):
    storage = tmp_path / "dvc-storage"
    dvc(pipeline, "remote", "add", "-d", "-f", "localstore", str(storage))
    commit_all(pipeline, "local remote")
    pushed = dvc(pipeline, "push", *WITH_DEPS)
    assert "pushed" in pushed.stdout, pushed.stdout
    assert any(storage.rglob("*")), "nothing landed in the remote directory"

    fresh = clone(pipeline, tmp_path / "clone")
    cached = cached_outs(fresh)
    assert "artifacts/models/pruned" in cached and digest(fresh, cached) == {}  # not in git: the remote brings them
    dvc(fresh, "pull", *WITH_DEPS)
    assert digest(fresh) == digest(pipeline)
    assert_up_to_date(fresh)


def test_s3_remote_round_trip(pipeline, tmp_path, s3_server, offline_aws):
    import boto3

    dvc(pipeline, "remote", "add", "-d", "-f", "s3store", f"s3://{BUCKET}/clipprune")
    dvc(pipeline, "remote", "modify", "s3store", "endpointurl", s3_server)
    # credentials go to the git-ignored .dvc/config.local, never into the committed config
    dvc(pipeline, "remote", "modify", "--local", "s3store", "access_key_id", "testing")
    dvc(pipeline, "remote", "modify", "--local", "s3store", "secret_access_key", "testing")
    commit_all(pipeline, "s3 remote")
    assert "testing" not in git(pipeline, "show", "HEAD:.dvc/config")
    dvc(pipeline, "push", *WITH_DEPS)
    objects = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing").list_objects_v2(Bucket=BUCKET, Prefix="clipprune/")
    assert objects.get("KeyCount", 0) > 0

    fresh = clone(pipeline, tmp_path / "clone")
    assert not (fresh / ".dvc/config.local").exists()
    offline_aws.setenv("AWS_ACCESS_KEY_ID", "testing")  # the clone's user brings credentials by environment
    offline_aws.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    dvc(fresh, "pull", *WITH_DEPS)
    assert digest(fresh) == digest(pipeline)
    assert_up_to_date(fresh)


def test_unreachable_remote_fails_clearly_and_leaves_the_workspace(pipeline, tmp_path, offline_aws):
    # one connection attempt per request instead of botocore's retries with back-off (about 100 s in all):
    # the failure and its message are the same, only sooner
    offline_aws.setenv("AWS_MAX_ATTEMPTS", "1")
    offline_aws.setenv("AWS_ACCESS_KEY_ID", "testing")
    offline_aws.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"
    dvc(pipeline, "remote", "add", "-d", "-f", "deadstore", f"s3://{BUCKET}/clipprune")
    dvc(pipeline, "remote", "modify", "deadstore", "endpointurl", endpoint)
    commit_all(pipeline, "unreachable remote")
    before = digest(pipeline)

    # the project wrapper checks first and says so in one line, without dvc's retries
    wrapped = subprocess.run([sys.executable, "scripts/remote.py", "push", *WITH_DEPS], cwd=pipeline,
                             capture_output=True, text=True, env=env(), timeout=120)
    assert wrapped.returncode == 1
    assert wrapped.stderr.strip() == (f"remote: error: remote 'deadstore' (s3://{BUCKET}/clipprune at {endpoint}) is "
                                      "unreachable: Connection refused; nothing was pushed and the workspace is unchanged")

    push = dvc(pipeline, "push", *WITH_DEPS, check=False, timeout=300)
    assert push.returncode != 0
    assert "Could not connect to the endpoint URL" in push.stderr and endpoint in push.stderr, push.stderr
    assert digest(pipeline) == before
    assert "up to date" in dvc(pipeline, "status", "--with-deps", TARGET).stdout

    fresh = clone(pipeline, tmp_path / "clone")
    pull = dvc(fresh, "pull", *WITH_DEPS, check=False, timeout=300)
    assert pull.returncode != 0
    assert "Could not connect to the endpoint URL" in pull.stderr, pull.stderr
    assert digest(fresh, cached_outs(fresh)) == {}  # no partial outputs
    assert git(fresh, "status", "--porcelain") == ""

    # the failed pull changed nothing: naming a reachable remote, the same clone recovers
    storage = tmp_path / "recovery-storage"
    dvc(pipeline, "remote", "add", "--local", "-f", "recovery", str(storage))
    dvc(pipeline, "push", *WITH_DEPS, "-r", "recovery")
    dvc(fresh, "remote", "add", "--local", "recovery", str(storage))
    dvc(fresh, "pull", *WITH_DEPS, "-r", "recovery")
    assert digest(fresh) == before
