"""Fetch a dataset archive (local path, file:// or http(s) URL), verify its sha256, extract it safely.

Extraction goes to a temporary directory beside the target and is renamed into place only when every
member was written, so a failure (bad checksum, corrupt archive, unsafe member) leaves nothing behind.
Members that would land outside the target (absolute paths, ``..``) and links of any kind are refused.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from tqdm import tqdm

from ..errors import DataError, ParamError
from ..io import atomic_dir

CHUNK = 1 << 20

# Official COCO 2017 archives. sha256 is None: not verified here (no network on the build machine).
# The md5 values are the ones published in public download scripts, for reference only.
COCO2017_ARCHIVES: dict[str, dict] = {
    "train2017.zip": {"url": "http://images.cocodataset.org/zips/train2017.zip",
                      "sha256": None, "md5": "cced6f7f71b7629ddf16f17bbcfab6b2"},
    "val2017.zip": {"url": "http://images.cocodataset.org/zips/val2017.zip",
                    "sha256": None, "md5": "442b8da7639aecaf257c1dceb8ba8c80"},
    "annotations_trainval2017.zip": {"url": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                                     "sha256": None, "md5": "f4bbac642086de4f52a3fdda2de5fa2c"},
}

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Errors that mean "the archive's bytes are bad" while reading it (not disk or permission problems).
_CORRUPT_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                   gzip.BadGzipFile, NotImplementedError)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, name: str, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                      desc=f"download {Path(urllib.parse.urlparse(url).path).name}", disable=not progress) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"{name}: cannot download {url}: {reason}") from None


@contextlib.contextmanager
def _local_archive(source: str, target_dir: Path, name: str, progress: bool) -> Iterator[Path]:
    """Yield a local file holding the archive; a download lives in a temp file beside the target."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(PurePosixPath(parsed.path).suffixes[-2:])  # keep .tar.gz etc. for type detection
        fd, tmp = tempfile.mkstemp(prefix=f".{target_dir.name}.download.", suffix=suffix, dir=target_dir.parent)
        os.close(fd)
        try:
            _download(source, Path(tmp), name, progress)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    path = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(source)
    if not path.is_file():
        raise DataError(f"{name}: archive not found: {path}")
    yield path


def _archive_kind(path: Path, label: str, name: str) -> str:
    lower = _short(label).lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except _CORRUPT_ERRORS + (OSError,):
        pass
    raise DataError(f"{name}: {label} is not a valid zip/tar archive")


def _short(label: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(label).path).name or label


def _safe_parts(member: str, label: str, name: str) -> tuple[str, ...]:
    """Path parts of a member inside the target; DataError for anything that could escape it."""
    normalized = member.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise DataError(f"{name}: {label}: refusing member with an absolute path: {member!r}")
    parts = tuple(p for p in normalized.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"{name}: {label}: refusing member that escapes the target directory: {member!r}")
    return parts


def _destination(root: Path, parts: tuple[str, ...], member: str, label: str, name: str) -> Path:
    dest = root.joinpath(*parts)
    # Belt and braces: resolved path must stay under root (catches anything _safe_parts missed).
    if os.path.commonpath([os.path.realpath(root), os.path.realpath(dest)]) != os.path.realpath(root):
        raise DataError(f"{name}: {label}: refusing member that escapes the target directory: {member!r}")
    return dest


def _copy_member(src: BinaryIO, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def _extract_zip(path: Path, root: Path, label: str, name: str, progress: bool) -> int:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{name}: {label} is not a valid zip archive ({err})") from None
    with zf:
        members = zf.infolist()
        planned = []
        for info in members:  # check every member before writing any
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{name}: {label}: refusing symbolic link member {info.filename!r}")
            planned.append((info, _safe_parts(info.filename, label, name)))
        for info, parts in tqdm(planned, desc=f"extract {_short(label)}", unit="file", disable=not progress):
            if not parts:
                continue
            dest = _destination(root, parts, info.filename, label, name)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            try:
                with zf.open(info) as src:
                    _copy_member(src, dest)
            except _CORRUPT_ERRORS as err:
                raise DataError(f"{name}: {label} is not a valid zip archive "
                                f"(member {info.filename!r}: {err})") from None
        return len(planned)


def _extract_tar(path: Path, root: Path, label: str, name: str, progress: bool) -> int:
    try:
        tf = tarfile.open(path, "r:*")
    except _CORRUPT_ERRORS + (OSError,) as err:
        raise DataError(f"{name}: {label} is not a valid tar archive ({err})") from None
    count = 0
    with tf:
        try:
            # Streaming iteration reads headers as it goes; a truncated stream fails here.
            for member in tqdm(tf, desc=f"extract {_short(label)}", unit="file", disable=not progress):
                if member.issym() or member.islnk():
                    raise DataError(f"{name}: {label}: refusing link member {member.name!r} "
                                    f"-> {member.linkname!r}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"{name}: {label}: refusing special file member {member.name!r}")
                parts = _safe_parts(member.name, label, name)
                count += 1
                if not parts:
                    continue
                dest = _destination(root, parts, member.name, label, name)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                src = tf.extractfile(member)
                if src is None:
                    raise DataError(f"{name}: {label}: cannot read member {member.name!r}")
                with src:
                    _copy_member(src, dest)
        except _CORRUPT_ERRORS as err:
            raise DataError(f"{name}: {label} is not a valid tar archive ({err})") from None
    return count


def fetch_and_extract(source: str | os.PathLike, target_dir: str | os.PathLike, sha256: str | None = None, *,
                      name: str = "data.source", progress: bool = True) -> Path:
    """Fetch ``source`` (local path, file:// or http(s) URL), check ``sha256``, extract into ``target_dir``.

    ``target_dir`` is replaced atomically: on any error it is left as it was (absent if it was absent).
    Errors are DataError (missing file, download failure, checksum mismatch, corrupt archive, unsafe
    member) or ParamError (malformed ``sha256``), each one line starting with ``name``.
    Returns ``target_dir``.
    """
    source = os.fspath(source)
    if not source:
        raise ParamError(f"{name} must be a local path or a file://, http:// or https:// URL, got ''")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256)):
        raise ParamError(f"{name}: sha256 must be 64 hexadecimal characters, got {sha256!r}")
    target_dir = Path(target_dir)
    label = source  # errors name the archive as the user gave it
    with _local_archive(source, target_dir, name, progress) as archive_path:
        if sha256 is not None:
            actual = sha256_file(archive_path)
            if actual != sha256.lower():
                raise DataError(f"{name}: sha256 mismatch for {source}: expected {sha256.lower()}, got {actual}")
        kind = _archive_kind(archive_path, label, name)
        with atomic_dir(target_dir) as tmp:
            extract = _extract_zip if kind == "zip" else _extract_tar
            if extract(archive_path, tmp, label, name, progress) == 0:
                raise DataError(f"{name}: {label} contains no files")
    return target_dir
