"""`dvc push` / `dvc pull` with a reachability check of the remote first (one clear line when it is down).

    python scripts/remote.py check [-r NAME]          # is the remote reachable? (exit 0 / 1)
    python scripts/remote.py push  [-r NAME] [dvc push options, e.g. -j 4]
    python scripts/remote.py pull  [-r NAME] [dvc pull options, e.g. artifacts/models/pruned]

DVC itself fails on an unreachable remote, but only after its retries, as an "unexpected error" with exit
status 255. This wrapper reads the remote from `.dvc/config` (+ `.dvc/config.local`), and for a local
directory (a path or `file://` URL) checks that it is a directory (check, pull) or one `dvc push` can
create (no file at the path or on the way to it), for an S3-compatible `endpointurl` or an http(s)/ssh URL that
its host accepts a TCP connection, before handing over to dvc. A remote on AWS itself (s3:// without
`endpointurl`) is not probed: the check contacts nothing but the configured endpoint.
"""
from __future__ import annotations

import argparse
import configparser
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22, "sftp": 22}


class RemoteError(Exception):
    """The remote is not configured or not reachable (message: one line)."""


def read_remotes(repo: Path = Path(".")) -> tuple[dict[str, dict[str, str]], str | None]:
    """``({name: options}, default name)`` from ``.dvc/config`` overlaid with ``.dvc/config.local``."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([repo / ".dvc" / "config", repo / ".dvc" / "config.local"])
    remotes = {}
    for section in parser.sections():
        title = section.strip("'")  # dvc writes ['remote "name"']
        if title.startswith("remote "):
            remotes[title.split(" ", 1)[1].strip('"')] = dict(parser[section])
    default = parser.get("core", "remote", fallback=None)
    return remotes, default


def probe_target(options: dict[str, str]) -> tuple[str, int] | None:
    """(host, port) to probe for a remote's options, or None when there is nothing local to check."""
    endpoint = options.get("endpointurl")
    url = urlparse(endpoint or options.get("url", ""))
    if url.scheme in DEFAULT_PORTS and url.hostname:
        return url.hostname, url.port or DEFAULT_PORTS[url.scheme]
    return None


def check_remote(name: str | None, action: str, repo: Path = Path("."), timeout: float = 5.0) -> str:
    """Raise RemoteError unless remote ``name`` (default remote if None) looks usable for ``action``;
    returns the remote's name."""
    remotes, default = read_remotes(repo)
    name = name or default
    if not name:
        raise RemoteError("no remote given (-r NAME) and no default remote in .dvc/config "
                          "(set one with `dvc remote add -d NAME URL`)")
    if name not in remotes or "url" not in remotes[name]:
        raise RemoteError(f"remote '{name}' is not configured in .dvc/config (known: {sorted(remotes) or 'none'})")
    options = remotes[name]
    url = options["url"]
    target = probe_target(options)
    if target is not None:
        host, port = target
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as err:
            where = options.get("endpointurl", url)
            unchanged = "" if action == "check" else f"; nothing was {action}ed and the workspace is unchanged"
            raise RemoteError(f"remote '{name}' ({url} at {where}) is unreachable: {err.strerror or err}"
                              f"{unchanged}") from None
    elif "://" not in url or urlparse(url).scheme == "file":
        check_local_directory(name, local_path(url, repo), action)
    return name


def local_path(url: str, repo: Path) -> Path:
    """The directory of a local remote: ``file://`` URLs and paths, relative ones to ``.dvc/`` as dvc does."""
    if urlparse(url).scheme == "file":
        url = urlparse(url).path
    path = Path(url).expanduser()
    return path if path.is_absolute() else repo / ".dvc" / path


def check_local_directory(name: str, path: Path, action: str) -> None:
    """RemoteError unless ``path`` is a directory (``check``, ``pull``) or one ``dvc push`` can create.

    A file at the path, or at any folder on the way, would make dvc fail with an "unexpected error".
    """
    unchanged = "" if action == "check" else f"; nothing was {action}ed and the workspace is unchanged"
    if path.is_dir():
        return
    if path.exists():
        raise RemoteError(f"remote '{name}' points at {path}, which is not a directory{unchanged}")
    ancestor = next(parent for parent in path.parents if parent.exists())  # "/" at the latest
    if not ancestor.is_dir():
        raise RemoteError(f"remote '{name}' points at {path}, but {ancestor} is not a directory{unchanged}")
    if action != "push":  # dvc push creates the directory; there is nothing to check or pull from yet
        hint = " (dvc push creates it)" if action == "check" else ""
        raise RemoteError(f"remote '{name}' is a local directory that does not exist: {path}{hint}{unchanged}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "push", "pull"])
    parser.add_argument("-r", "--remote", help="remote name (default: the default remote)")
    args, dvc_args = parser.parse_known_args(argv)  # the rest goes to dvc push / pull
    try:
        name = check_remote(args.remote, args.action)
    except RemoteError as err:
        print(f"remote: error: {err}", file=sys.stderr)
        return 1
    if args.action == "check":
        print(f"remote: '{name}' is reachable")  # a local directory: it exists
        return 0
    extra = [a for a in dvc_args if a != "--"]
    return subprocess.run(["dvc", args.action, "-r", name, *extra]).returncode


if __name__ == "__main__":
    sys.exit(main())
