"""Fetch a dataset archive (local path, file:// or http(s) URL), verify its sha256, extract it safely.

Extraction goes to a temporary directory beside the target and is renamed into place only when every
member was written, so a failure (bad checksum, corrupt archive, unsafe member, a limit exceeded) leaves
nothing behind. Every member-level problem is a one-line DataError naming the archive and the member:

* names: absolute, ``..``, NUL or other control characters, a component longer than the filesystem's
  NAME_MAX or a path longer than PATH_MAX, two members that extract to the same path (exact duplicates, or
  names equal after removing ``.``/empty parts), a file where another member needs a directory, and names
  that differ only in letter case or Unicode normalisation (one file on macOS/Windows filesystems, so the
  result would depend on where it is extracted);
* types: links of any kind, devices, FIFOs and unknown tar types (tar members also go through
  ``tarfile.data_filter``, PEP 706), encrypted zip members, zip compression methods zipfile cannot read;
* sizes: what all archives of a dataset extract is capped at ``MAX_EXTRACTED_BYTES``; an archive, and a zip
  member, may not expand more than ``MAX_COMPRESSION_RATIO`` times their compressed size once they pass
  ``RATIO_FREE_BYTES``. Sizes are checked from the headers before anything is written and the bytes actually
  written are counted too (a member may not yield more than its header declares).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator


from ..errors import DataError, ParamError
from ..io import atomic_dir
from ..progress import progress_bar

CHUNK = 1 << 20

# Extraction limits (decompression bombs). COCO 2017 in all (train 18 GB, val 0.8 GB, annotations 0.8 GB
# extracted) is ~20 GB; the cap leaves room for ImageNet val (6.4 GB) or larger folders alongside.
MAX_EXTRACTED_BYTES = 64 << 30
# Images (JPEG/PNG) barely compress and JSON annotations compress ~5-15:1; 100:1 is a bomb.
MAX_COMPRESSION_RATIO = 100
# Ratios are not checked below this size (tiny, repetitive text files compress far better than 100:1).
RATIO_FREE_BYTES = 16 << 20

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
# What reading a damaged archive can raise besides: bz2/lzma streams and seeks to bad offsets raise OSError,
# zipfile's header parsing ValueError (bad encodings, bad offsets), struct.error and OverflowError.
_READ_ERRORS = _CORRUPT_ERRORS + (OSError, ValueError, struct.error, OverflowError)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, name: str, progress: bool) -> None:
    """Download ``url`` to ``dest``: at most ``MAX_EXTRACTED_BYTES``, and all of its Content-Length."""
    limit = MAX_EXTRACTED_BYTES  # an archive is never larger than what it may extract to (plus headers)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = response.headers.get("Content-Length")
            expected = int(total) if total and total.isdigit() else None
            if expected is not None and expected > limit:
                raise DataError(f"{name}: {url} is {_size(expected)}, over the limit of {_size(limit)} "
                                f"(MAX_EXTRACTED_BYTES in clipprune/data/archive.py)")
            received = 0
            with progress_bar(total=expected, unit="B", unit_scale=True,
                              desc=f"download {Path(urllib.parse.urlparse(url).path).name}", enabled=progress) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    received += len(chunk)
                    if received > limit:
                        raise DataError(f"{name}: {url} sends more than {_size(limit)}, the limit "
                                        f"(MAX_EXTRACTED_BYTES in clipprune/data/archive.py)")
                    out.write(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise DataError(f"{name}: cannot download {url}: the connection ended after {received} of "
                                f"{expected} bytes")
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, a full disk
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
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
    except _READ_ERRORS:
        pass
    raise DataError(f"{name}: {label} is not a valid zip/tar archive")


def _short(label: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(label).path).name or label


def _show(member: str) -> str:
    """``repr`` of a member name, shortened when it is very long (messages stay readable)."""
    return repr(member) if len(member) <= 160 else repr(member[:100]) + "..." + repr(member[-40:])


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _safe_parts(member: str, label: str, name: str) -> tuple[str, ...]:
    """Path parts of a member inside the target; DataError for anything that could escape it."""
    normalized = member.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise DataError(f"{name}: {label}: refusing member with an absolute path: {_show(member)}")
    parts = tuple(p for p in normalized.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"{name}: {label}: refusing member that escapes the target directory: {_show(member)}")
    return parts


class ExtractionBudget:
    """Bytes the archives of one dataset may extract in all; pass one budget to each of its archives."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = MAX_EXTRACTED_BYTES if max_bytes is None else max_bytes
        self.used = 0


def _pathconf(root: Path, key: str, default: int) -> int:
    try:
        value = os.pathconf(root, key)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


# zip compression methods zipfile can read (encrypted / AES members are refused separately).
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}
_ZIP_ENCRYPTED = 0x1 | 0x40  # general purpose flag bits: traditional PKWARE / strong encryption
_FILE_TYPES = {stat.S_IFLNK: "symbolic link", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
               stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}
_TAR_TYPES = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


class _Extraction:
    """One archive being extracted into ``root``: member checks, clash tracking, size limits, writing."""

    def __init__(self, root: Path, label: str, name: str, kind: str, archive_bytes: int, budget: ExtractionBudget):
        self.root, self.label, self.name, self.kind = root, label, name, kind
        self.archive_bytes = archive_bytes
        self.budget = budget
        self.reserved = 0  # bytes this archive may write (checked against the limits before writing)
        self.files = 0
        self._claimed: dict[str, tuple[str, str, str]] = {}  # folded path -> (kind, path, member)
        self._name_max = _pathconf(root, "PC_NAME_MAX", 255)
        self._path_max = _pathconf(root, "PC_PATH_MAX", 4096)
        self._root_bytes = len(os.fsencode(str(root)))

    def fail(self, message: str) -> DataError:
        return DataError(f"{self.name}: {self.label}: {message}")

    def corrupt(self, member: str | None, err: BaseException | str) -> DataError:
        where = f"member {_show(member)}: " if member is not None else ""
        # tarfile.open("r:*") lists the reason of every method it tried, one per line
        reason = "; ".join(line.strip(" -") for line in str(err).splitlines() if line.strip(" -"))
        return DataError(f"{self.name}: {self.label} is not a valid {self.kind} archive ({where}{reason})")

    # ------------------------------------------------------------ names

    def plan(self, member: str, stored: str, is_dir: bool) -> tuple[str, ...]:
        """Checked path parts of ``member`` (``stored``: its name as stored, before zipfile cut it at NUL)."""
        if "\0" in stored:
            raise self.fail(f"refusing member whose name contains a NUL byte: {_show(stored)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in stored):
            raise self.fail(f"refusing member whose name contains a control character: {_show(stored)}")
        parts = _safe_parts(member, self.label, self.name)
        if not parts:
            if is_dir:
                return parts  # "./": the target itself
            raise self.fail(f"refusing file member with an empty name: {_show(member)}")
        total = self._root_bytes
        for part in parts:
            try:
                size = len(os.fsencode(part))
            except UnicodeError:
                raise self.fail(f"refusing member whose name cannot be encoded for the filesystem: "
                                f"{_show(member)}") from None
            if size > self._name_max:
                raise self.fail(f"refusing member {_show(member)}: its name part {_show(part)} is {size} bytes, "
                                f"the filesystem holds at most {self._name_max}")
            total += 1 + size
        if total >= self._path_max:
            raise self.fail(f"refusing member {_show(member)}: its path would be {total} bytes, the filesystem "
                            f"holds at most {self._path_max - 1}")
        self._claim(parts, is_dir, member)
        return parts

    def _claim(self, parts: tuple[str, ...], is_dir: bool, member: str) -> None:
        """Refuse a member whose path (or a folder above it) another member already holds differently."""
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            kind = "directory" if depth < len(parts) or is_dir else "file"
            # one key for names a case-insensitive or normalising filesystem (macOS, Windows) stores as one
            key = unicodedata.normalize("NFC", path).casefold()
            if key not in self._claimed:
                self._claimed[key] = (kind, path, member)
                continue
            seen_kind, seen_path, seen_member = self._claimed[key]
            if seen_path != path:
                raise self.fail(f"members {_show(seen_member)} and {_show(member)} differ only in letter case or "
                                f"Unicode normalisation ({_show(seen_path)} vs {_show(path)}): one file on "
                                f"case-insensitive filesystems")
            if kind == seen_kind == "directory":
                continue
            if kind != seen_kind:
                raise self.fail(f"member {_show(member)} clashes with member {_show(seen_member)}: "
                                f"{_show(path)} would be both a file and a directory")
            if seen_member == member:
                raise self.fail(f"duplicate member {_show(member)}")
            raise self.fail(f"members {_show(seen_member)} and {_show(member)} both extract to {_show(path)}")

    # ------------------------------------------------------------ sizes

    def check_member_ratio(self, member: str, size: int, compressed: int) -> None:
        if size > RATIO_FREE_BYTES and size > MAX_COMPRESSION_RATIO * max(compressed, 1):
            raise self.fail(f"member {_show(member)} would expand {_size(compressed)} to {_size(size)} "
                            f"({size / max(compressed, 1):.0f}:1), over the limit of {MAX_COMPRESSION_RATIO}:1 "
                            f"for members over {_size(RATIO_FREE_BYTES)} (MAX_COMPRESSION_RATIO in "
                            f"clipprune/data/archive.py)")

    def reserve(self, size: int, what: str) -> None:
        """Admit ``size`` more bytes of output (``what`` names them) or refuse before any is written."""
        total = self.reserved + size
        if total > RATIO_FREE_BYTES and total > MAX_COMPRESSION_RATIO * max(self.archive_bytes, 1):
            raise self.fail(f"{what} would expand the {_size(self.archive_bytes)} archive to {_size(total)} "
                            f"({total / max(self.archive_bytes, 1):.0f}:1), over the limit of "
                            f"{MAX_COMPRESSION_RATIO}:1 beyond {_size(RATIO_FREE_BYTES)} (MAX_COMPRESSION_RATIO "
                            f"in clipprune/data/archive.py)")
        if self.budget.used + size > self.budget.max_bytes:
            raise self.fail(f"{what} would bring the extracted data to {_size(self.budget.used + size)}, over the "
                            f"limit of {_size(self.budget.max_bytes)} (MAX_EXTRACTED_BYTES in "
                            f"clipprune/data/archive.py)")
        self.reserved = total
        self.budget.used += size

    def check_free_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if size > free:
            raise self.fail(f"its members need {_size(size)} but the disk holding {self.root.parent} has "
                            f"{_size(free)} free")

    # ------------------------------------------------------------ writing

    def make_dir(self, parts: tuple[str, ...], member: str) -> None:
        dest = self._destination(parts, member)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self.fail(f"cannot extract member {_show(member)}: {err.strerror or err}") from None

    def write(self, src: BinaryIO, parts: tuple[str, ...], member: str, declared: int) -> None:
        """Copy ``src`` to the member's path, counting bytes: no more than the ``declared`` (reserved) size."""
        dest = self._destination(parts, member)
        written = 0
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as out:
                while True:
                    try:  # reading the archive: any failure here is the archive's
                        chunk = src.read(CHUNK)
                    except _READ_ERRORS as err:
                        raise self.corrupt(member, err) from None
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > declared:
                        raise self.fail(f"member {_show(member)} holds more data than the {declared} bytes its "
                                        f"header declares")
                    out.write(chunk)
        except OSError as err:  # writing: the filesystem cannot hold it (name, space, permissions)
            raise self.fail(f"cannot extract member {_show(member)}: {err.strerror or err}") from None
        if written != declared:
            raise self.fail(f"member {_show(member)} holds {written} bytes, its header declares {declared}")
        self.files += 1

    def _destination(self, parts: tuple[str, ...], member: str) -> Path:
        dest = self.root.joinpath(*parts)
        # Belt and braces: resolved path must stay under root (catches anything the name checks missed).
        root = os.path.realpath(self.root)
        if os.path.commonpath([root, os.path.realpath(dest)]) != root:
            raise self.fail(f"refusing member that escapes the target directory: {_show(member)}")
        return dest


def _extract_zip(path: Path, ex: _Extraction, progress: bool) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as err:
        raise ex.corrupt(None, err) from None
    with zf:
        planned, declared = [], 0
        for info in zf.infolist():  # the central directory: check every member before writing any
            member, mode = info.filename, info.external_attr >> 16
            file_type = stat.S_IFMT(mode)
            if file_type == stat.S_IFLNK:
                raise ex.fail(f"refusing symbolic link member {_show(member)}")
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise ex.fail(f"refusing special file member {_show(member)} "
                              f"({_FILE_TYPES.get(file_type, f'file type {file_type:o}')})")
            if info.flag_bits & _ZIP_ENCRYPTED:
                raise ex.fail(f"refusing encrypted member {_show(member)} (encrypted archives are not supported)")
            if info.compress_type not in _ZIP_METHODS:
                raise ex.fail(f"member {_show(member)} uses compression method {info.compress_type}, which "
                              f"cannot be read (expected one of {', '.join(_ZIP_METHODS.values())})")
            is_dir = info.is_dir()
            if is_dir and info.file_size:
                raise ex.fail(f"directory member {_show(member)} holds {info.file_size} bytes of data")
            if file_type == stat.S_IFDIR and not is_dir:
                raise ex.fail(f"member {_show(member)} is marked as a directory but named as a file "
                              f"(no trailing '/')")
            parts = ex.plan(member, info.orig_filename, is_dir)
            if not is_dir:
                ex.check_member_ratio(member, info.file_size, info.compress_size)
                declared += info.file_size
            planned.append((info, parts, is_dir))
        ex.reserve(declared, f"its members ({_size(declared)} declared in all)")
        ex.check_free_space(declared)
        for info, parts, is_dir in progress_bar(planned, desc=f"extract {_short(ex.label)}", unit="file",
                                                enabled=progress):
            if not parts:
                continue
            if is_dir:
                ex.make_dir(parts, info.filename)
                continue
            try:
                src = zf.open(info)
            except _READ_ERRORS + (RuntimeError,) as err:
                raise ex.corrupt(info.filename, err) from None
            with src:  # zipfile stops at the declared size and checks the CRC at the end
                ex.write(src, parts, info.filename, info.file_size)


def _filter_message(err: tarfile.FilterError, member: tarfile.TarInfo) -> str:
    """One line for what ``tarfile.data_filter`` refused."""
    shown = _show(member.name)
    if isinstance(err, tarfile.AbsolutePathError):
        return f"refusing member with an absolute path: {shown}"
    if isinstance(err, tarfile.OutsideDestinationError):
        return f"refusing member that escapes the target directory: {shown}"
    if isinstance(err, tarfile.SpecialFileError):
        kind = _TAR_TYPES.get(member.type, f"unknown tar type {member.type!r}")
        return f"refusing special file member {shown} ({kind})"
    if isinstance(err, (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError)):
        return f"refusing link member {shown} -> {member.linkname!r}"
    return f"refusing member {shown}: {err}"


def _extract_tar(path: Path, ex: _Extraction, progress: bool) -> None:
    try:
        tf = tarfile.open(path, "r:*")
    except _READ_ERRORS as err:
        raise ex.corrupt(None, err) from None
    with tf:
        member = None
        try:
            # Streaming iteration reads headers as it goes; a truncated stream fails here.
            for member in progress_bar(tf, desc=f"extract {_short(ex.label)}", unit="file", enabled=progress):
                if member.issym() or member.islnk():
                    raise ex.fail(f"refusing link member {_show(member.name)} -> {member.linkname!r}")
                parts = ex.plan(member.name, member.name, member.isdir())
                try:
                    tarfile.data_filter(member, str(ex.root))  # PEP 706: special files, escapes
                except tarfile.FilterError as err:
                    raise ex.fail(_filter_message(err, member)) from None
                if not (member.isfile() or member.isdir()):
                    raise ex.fail(f"refusing special file member {_show(member.name)}")
                if not parts:
                    continue
                if member.isdir():
                    ex.make_dir(parts, member.name)
                    continue
                ex.reserve(member.size, f"member {_show(member.name)} ({_size(member.size)})")
                src = tf.extractfile(member)
                if src is None:
                    raise ex.fail(f"cannot read member {_show(member.name)}")
                with src:
                    ex.write(src, parts, member.name, member.size)
            member = None
            _check_tar_end(tf, ex)
        except _READ_ERRORS as err:  # reading headers or the end (writes map their own OSErrors)
            raise ex.corrupt(member.name if member is not None else None, err) from None


def _check_tar_end(tf: tarfile.TarFile, ex: _Extraction) -> None:
    """The archive ends with an end-of-archive block and zeros only, and its compressed stream checks out.

    tarfile stops iterating without an error at a corrupt header that follows a good member, ignores
    whatever follows the end-of-archive block (members could hide there), and never reads a gzip/bz2/xz
    stream to its end, where the checksum is: each of these would pass a damaged archive.
    """
    fileobj = tf.fileobj
    fileobj.seek(tf.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise ex.corrupt(None, f"it ends at byte {tf.offset + len(block)} without an end-of-archive block")
    if block.count(0) != tarfile.BLOCKSIZE:
        raise ex.corrupt(None, f"unreadable member header at byte {tf.offset}")
    position = tf.offset + len(block)
    limit = max(RATIO_FREE_BYTES, MAX_COMPRESSION_RATIO * ex.archive_bytes)  # a bomb of zeros after the end
    for chunk in iter(lambda: fileobj.read(CHUNK), b""):
        if chunk.count(0) != len(chunk):
            where = position + len(chunk) - len(chunk.lstrip(b"\0"))
            raise ex.corrupt(None, f"data after the end-of-archive block at byte {where}")
        position += len(chunk)
        if position - tf.offset > limit:
            raise ex.fail(f"more than {_size(limit)} of padding follow the end of the archive")


def fetch_and_extract(source: str | os.PathLike, target_dir: str | os.PathLike, sha256: str | None = None, *,
                      name: str = "data.source", progress: bool = True,
                      budget: ExtractionBudget | None = None) -> Path:
    """Fetch ``source`` (local path, file:// or http(s) URL), check ``sha256``, extract into ``target_dir``.

    ``target_dir`` is replaced atomically: on any error it is left as it was (absent if it was absent).
    Errors are DataError (missing file, download failure, checksum mismatch, corrupt archive, unsafe or
    clashing member, a size limit exceeded) or ParamError (malformed ``sha256``), each one line starting
    with ``name``. ``budget`` (shared by the archives of one dataset) caps the bytes extracted; by default
    this archive alone may extract ``MAX_EXTRACTED_BYTES``. Returns ``target_dir``.
    """
    source = os.fspath(source)
    if not source:
        raise ParamError(f"{name} must be a local path or a file://, http:// or https:// URL, got ''")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256)):
        raise ParamError(f"{name}: sha256 must be 64 hexadecimal characters, got {sha256!r}")
    target_dir = Path(target_dir)
    budget = ExtractionBudget() if budget is None else budget
    label = source  # errors name the archive as the user gave it
    with _local_archive(source, target_dir, name, progress) as archive_path:
        if sha256 is not None:
            actual = sha256_file(archive_path)
            if actual != sha256.lower():
                raise DataError(f"{name}: sha256 mismatch for {source}: expected {sha256.lower()}, got {actual}")
        kind = _archive_kind(archive_path, label, name)
        with atomic_dir(target_dir) as tmp:
            extraction = _Extraction(tmp, label, name, kind, archive_path.stat().st_size, budget)
            (_extract_zip if kind == "zip" else _extract_tar)(archive_path, extraction, progress)
            if extraction.files == 0:
                raise DataError(f"{name}: {label} contains no files")
    return target_dir
