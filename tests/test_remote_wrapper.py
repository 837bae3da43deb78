"""scripts/remote.py: remote resolution from .dvc/config and the reachability check (fast; no dvc run)."""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "remote.py"
spec = importlib.util.spec_from_file_location("remote_wrapper", SCRIPT)
remote = importlib.util.module_from_spec(spec)
spec.loader.exec_module(remote)


def write_config(repo: Path, text: str, local: str = "") -> Path:
    (repo / ".dvc").mkdir(parents=True, exist_ok=True)
    (repo / ".dvc" / "config").write_text(text)
    if local:
        (repo / ".dvc" / "config.local").write_text(local)
    return repo


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reads_remotes_default_and_local_overrides(tmp_path):
    repo = write_config(tmp_path, "[core]\n    remote = s3r\n['remote \"s3r\"']\n    url = s3://b/p\n"
                                  "    endpointurl = http://127.0.0.1:9000\n",
                        local="['remote \"s3r\"']\n    access_key_id = k\n")
    remotes, default = remote.read_remotes(repo)
    assert default == "s3r"
    assert remotes["s3r"] == {"url": "s3://b/p", "endpointurl": "http://127.0.0.1:9000", "access_key_id": "k"}
    assert remote.probe_target(remotes["s3r"]) == ("127.0.0.1", 9000)
    assert remote.probe_target({"url": "s3://bucket/path"}) is None  # AWS itself: never probed
    assert remote.probe_target({"url": "https://example.org/store"}) == ("example.org", 443)


def test_closed_port_is_one_clear_line(tmp_path):
    port = closed_port()
    repo = write_config(tmp_path, f"[core]\n    remote = dead\n['remote \"dead\"']\n    url = s3://b/p\n"
                                  f"    endpointurl = http://127.0.0.1:{port}\n")
    with pytest.raises(remote.RemoteError) as err:
        remote.check_remote(None, "push", repo, timeout=2)
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "unreachable" in message
    assert "nothing was pushed" in message


def test_listening_endpoint_passes(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        repo = write_config(tmp_path, f"['remote \"up\"']\n    url = s3://b/p\n    endpointurl = http://127.0.0.1:{port}\n")
        assert remote.check_remote("up", "pull", repo) == "up"


def test_local_directory_remote(tmp_path):
    repo = write_config(tmp_path / "repo", "[core]\n    remote = store\n['remote \"store\"']\n    url = ../../storage\n")
    with pytest.raises(remote.RemoteError, match="local directory that does not exist"):
        remote.check_remote(None, "pull", repo)
    assert remote.check_remote(None, "push", repo) == "store"  # dvc push creates the directory
    (tmp_path / "storage").mkdir()  # relative to .dvc/, as dvc resolves it
    assert remote.check_remote(None, "pull", repo) == "store"


def test_unknown_or_missing_remote(tmp_path):
    repo = write_config(tmp_path, "[core]\n    autostage = true\n")
    with pytest.raises(remote.RemoteError, match="no default remote"):
        remote.check_remote(None, "pull", repo)
    with pytest.raises(remote.RemoteError, match="remote 'nope' is not configured"):
        remote.check_remote("nope", "pull", repo)


def test_main_exit_status(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, f"['remote \"dead\"']\n    url = s3://b/p\n    endpointurl = http://127.0.0.1:{closed_port()}\n")
    monkeypatch.chdir(tmp_path)
    assert remote.main(["pull", "-r", "dead"]) == 1
    assert capsys.readouterr().err.startswith("remote: error: remote 'dead'")


def local_remote(tmp_path: Path, url: str) -> Path:
    return write_config(tmp_path / "repo", f"[core]\n    remote = store\n['remote \"store\"']\n    url = {url}\n")


@pytest.mark.parametrize("action", ["check", "pull"])
@pytest.mark.parametrize("url", ["../../missing", "ABSOLUTE", "FILE_URL"])
def test_missing_local_directory_is_not_reachable(tmp_path, action, url):
    missing = tmp_path / "missing"
    url = {"ABSOLUTE": str(missing), "FILE_URL": f"file://{missing}"}.get(url, url)
    with pytest.raises(remote.RemoteError) as err:
        remote.check_remote(None, action, local_remote(tmp_path, url))
    message = str(err.value)
    assert "\n" not in message and "local directory that does not exist" in message and str(missing.name) in message
    assert ("dvc push creates it" in message) == (action == "check")


@pytest.mark.parametrize("action", ["check", "push", "pull"])
@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_local_remote_at_a_file_is_one_line(tmp_path, action, where):
    blocker = tmp_path / "store.txt"
    blocker.write_text("not a directory")
    path = blocker if where == "file" else blocker / "sub" / "store"
    with pytest.raises(remote.RemoteError) as err:
        remote.check_remote(None, action, local_remote(tmp_path, str(path)))
    message = str(err.value)
    assert "\n" not in message and str(blocker) in message and "not a directory" in message
    assert not blocker.is_dir() and blocker.read_text() == "not a directory"


def test_check_of_an_existing_local_directory_passes(tmp_path, capsys, monkeypatch):
    (tmp_path / "store").mkdir()
    repo = local_remote(tmp_path, str(tmp_path / "store"))
    monkeypatch.chdir(repo)
    assert remote.main(["check"]) == 0
    assert capsys.readouterr().out.strip() == "remote: 'store' is reachable"


def test_main_reports_a_file_remote_without_running_dvc(tmp_path, capsys, monkeypatch):
    (tmp_path / "store.txt").write_text("x")
    monkeypatch.chdir(local_remote(tmp_path, str(tmp_path / "store.txt")))
    monkeypatch.setattr(remote.subprocess, "run", lambda *a, **k: pytest.fail("dvc must not run"))
    assert remote.main(["push"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("remote: error: remote 'store' points at")
    assert "nothing was pushed" in err
