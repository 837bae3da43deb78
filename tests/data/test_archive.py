"""fetch_and_extract: good archives, checksum, corrupt and unsafe archives, member-level problems, size limits,
URLs."""
from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import io
import os
import stat
import struct
import tarfile
import threading
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from clipprune.data import archive as archive_module
from clipprune.data.archive import (COCO2017_ARCHIVES, RATIO_FREE_BYTES, ExtractionBudget, fetch_and_extract,
                                    sha256_file)
from clipprune.errors import DataError, ParamError

FILES = {"top/a.txt": b"alpha\n", "top/sub/b.bin": bytes(range(256)) * 10}


def make_zip(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, link_target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = 0o120777 << 16  # S_IFLNK
            zf.writestr(info, link_target)
    return path


def make_tar(path: Path, files: dict[str, bytes], links: list[tarfile.TarInfo] = ()) -> Path:
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in links:
            tf.addfile(info)
    return path


def link_info(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def assert_extracted(target: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (target / name).read_bytes() == data
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == sorted(files)


def assert_nothing_left(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
    assert leftovers == []


# ---------------------------------------------------------------- good archives

def test_zip_extracts_with_matching_sha256(tmp_path):
    archive = make_zip(tmp_path / "good.zip", FILES)
    target = tmp_path / "out" / "ds"
    result = fetch_and_extract(archive, target, sha256_file(archive), progress=False)
    assert result == target
    assert_extracted(target, FILES)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tar_extracts(tmp_path, suffix):
    archive = make_tar(tmp_path / f"good{suffix}", FILES)
    target = tmp_path / "ds"
    fetch_and_extract(archive, target, sha256_file(archive).upper(), progress=False)  # hex case ignored
    assert_extracted(target, FILES)


def test_existing_target_is_replaced_on_success_and_kept_on_failure(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "old.txt").write_text("old")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError):
        fetch_and_extract(bad, target, progress=False)
    assert (target / "old.txt").read_text() == "old"
    fetch_and_extract(make_zip(tmp_path / "good.zip", FILES), target, progress=False)
    assert_extracted(target, FILES)


def test_format_is_sniffed_when_the_name_has_no_known_suffix(tmp_path):
    archive = make_tar(tmp_path / "blob.tar", FILES)
    renamed = archive.rename(tmp_path / "blob.bin")
    fetch_and_extract(renamed, tmp_path / "ds", progress=False)
    assert_extracted(tmp_path / "ds", FILES)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


# ---------------------------------------------------------------- failures leave nothing

def test_sha256_mismatch(tmp_path):
    archive = make_zip(tmp_path / "good.zip", FILES)
    target = tmp_path / "ds"
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        fetch_and_extract(archive, target, wrong, name="data.source", progress=False)
    message = str(err.value)
    assert message.startswith("data.source: sha256 mismatch for ")
    assert "good.zip" in message and wrong in message and sha256_file(archive) in message
    assert "\n" not in message
    assert_nothing_left(tmp_path, target)


def test_malformed_sha256_is_a_param_error(tmp_path):
    archive = make_zip(tmp_path / "good.zip", FILES)
    with pytest.raises(ParamError, match="sha256 must be 64 hexadecimal"):
        fetch_and_extract(archive, tmp_path / "ds", "abc", progress=False)
    assert not (tmp_path / "ds").exists()


def test_missing_file(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(DataError, match=r"archive not found: .*nowhere\.zip"):
        fetch_and_extract(tmp_path / "nowhere.zip", target, progress=False)
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize("suffix,kind", [(".zip", "zip"), (".tar.gz", "tar"), (".tar", "tar")])
def test_truncated_archive(tmp_path, suffix, kind):
    payload = {"top/big.bin": bytes(range(256)) * 400}
    full = make_zip(tmp_path / f"full{suffix}", payload) if kind == "zip" else make_tar(tmp_path / f"full{suffix}", payload)
    data = full.read_bytes()
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    target = tmp_path / "ds"
    with pytest.raises(DataError) as err:
        fetch_and_extract(truncated, target, progress=False)
    assert f"cut{suffix}" in str(err.value)
    assert f"not a valid {kind} archive" in str(err.value)
    assert_nothing_left(tmp_path, target)


def test_unknown_format(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match=r"blob\.bin is not a valid zip/tar archive"):
        fetch_and_extract(blob, tmp_path / "ds", progress=False)
    assert_nothing_left(tmp_path, tmp_path / "ds")


def test_empty_archive(tmp_path):
    archive = make_zip(tmp_path / "empty.zip", {})
    with pytest.raises(DataError, match=r"empty\.zip contains no files"):
        fetch_and_extract(archive, tmp_path / "ds", progress=False)
    assert_nothing_left(tmp_path, tmp_path / "ds")


UNSAFE_NAMES = {"dotdot": "../evil.txt", "nested_dotdot": "top/../../evil.txt", "absolute": "/tmp/evil.txt",
                "backslash_dotdot": "..\\evil.txt"}


@pytest.mark.parametrize("case", sorted(UNSAFE_NAMES))
def test_zip_member_escaping_target_is_refused(tmp_path, case):
    member = UNSAFE_NAMES[case]
    archive = make_zip(tmp_path / "evil.zip", {"top/ok.txt": b"ok", member: b"evil"})
    assert member in zipfile.ZipFile(archive).namelist()
    target = tmp_path / "out" / "ds"
    with pytest.raises(DataError) as err:
        fetch_and_extract(archive, target, progress=False)
    assert "evil.zip" in str(err.value) and repr(member) in str(err.value)
    assert_nothing_left(tmp_path, target)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


@pytest.mark.parametrize("case", ["dotdot", "nested_dotdot", "absolute"])
def test_tar_member_escaping_target_is_refused(tmp_path, case):
    member = UNSAFE_NAMES[case]
    archive = make_tar(tmp_path / "evil.tar.gz", {"top/ok.txt": b"ok", member: b"evil"})
    with tarfile.open(archive) as tf:
        assert member in tf.getnames()
    target = tmp_path / "ds"
    with pytest.raises(DataError) as err:
        fetch_and_extract(archive, target, progress=False)
    assert "evil.tar.gz" in str(err.value) and repr(member) in str(err.value)
    assert_nothing_left(tmp_path, target)
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind,label", [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink")])
@pytest.mark.parametrize("link_target", ["../../outside.txt", "/etc/passwd"])
def test_tar_links_are_refused(tmp_path, kind, label, link_target):
    archive = make_tar(tmp_path / f"{label}.tar", {"top/ok.txt": b"ok"},
                       links=[link_info("top/link", link_target, kind)])
    target = tmp_path / "ds"
    with pytest.raises(DataError) as err:
        fetch_and_extract(archive, target, progress=False)
    message = str(err.value)
    assert f"{label}.tar" in message and "link member 'top/link'" in message and link_target in message
    assert_nothing_left(tmp_path, target)


def test_zip_symlink_is_refused(tmp_path):
    archive = make_zip(tmp_path / "link.zip", {"top/ok.txt": b"ok"}, symlinks={"top/link": "../../etc/passwd"})
    target = tmp_path / "ds"
    with pytest.raises(DataError) as err:
        fetch_and_extract(archive, target, progress=False)
    assert "link.zip" in str(err.value) and "symbolic link member 'top/link'" in str(err.value)
    assert_nothing_left(tmp_path, target)


def test_tar_special_file_is_refused(tmp_path):
    fifo = tarfile.TarInfo("top/pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = make_tar(tmp_path / "fifo.tar", {"top/ok.txt": b"ok"}, links=[fifo])
    with pytest.raises(DataError, match=r"fifo\.tar: refusing special file member 'top/pipe'"):
        fetch_and_extract(archive, tmp_path / "ds", progress=False)
    assert_nothing_left(tmp_path, tmp_path / "ds")


# ---------------------------------------------------------------- URLs

def test_file_url(tmp_path):
    archive = make_zip(tmp_path / "good.zip", FILES)
    fetch_and_extract(archive.as_uri(), tmp_path / "ds", sha256_file(archive), progress=False)
    assert_extracted(tmp_path / "ds", FILES)


def test_file_url_missing(tmp_path):
    with pytest.raises(DataError, match=r"archive not found: .*absent\.zip"):
        fetch_and_extract((tmp_path / "absent.zip").as_uri(), tmp_path / "ds", progress=False)


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 for the duration of a test."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_download_verifies_and_cleans_up(tmp_path, http_root):
    root, base = http_root
    archive = make_tar(root / "good.tar.gz", FILES)
    target = tmp_path / "raw" / "ds"
    fetch_and_extract(f"{base}/good.tar.gz", target, sha256_file(archive), progress=False)
    assert_extracted(target, FILES)
    assert [p.name for p in target.parent.iterdir()] == ["ds"]  # the temp download is gone


def test_http_download_sha256_mismatch(tmp_path, http_root):
    root, base = http_root
    make_zip(root / "good.zip", FILES)
    target = tmp_path / "raw" / "ds"
    with pytest.raises(DataError, match=r"sha256 mismatch for http://127\.0\.0\.1:\d+/good\.zip"):
        fetch_and_extract(f"{base}/good.zip", target, "1" * 64, progress=False)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_http_not_found(tmp_path, http_root):
    _, base = http_root
    with pytest.raises(DataError, match=r"data\.coco: cannot download http://127\.0\.0\.1:\d+/none\.zip"):
        fetch_and_extract(f"{base}/none.zip", tmp_path / "raw" / "ds", name="data.coco", progress=False)
    assert list((tmp_path / "raw").iterdir()) == []


def test_coco2017_constants():
    assert set(COCO2017_ARCHIVES) == {"train2017.zip", "val2017.zip", "annotations_trainval2017.zip"}
    for file_name, entry in COCO2017_ARCHIVES.items():
        assert entry["url"].startswith("http://images.cocodataset.org/")
        assert entry["url"].endswith("/" + file_name)
        assert entry["sha256"] is None or len(entry["sha256"]) == 64


# ---------------------------------------------------------------- member-level problems (zip)

def zip_entries(data: bytes) -> list[tuple[int, int, str]]:
    """(central directory entry offset, local header offset, name) of every member of a zip."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack_from("<HII", data, eocd + 10)
    entries = []
    for _ in range(count):
        assert data[offset:offset + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        local = struct.unpack_from("<I", data, offset + 42)[0]
        entries.append((offset, local, data[offset + 46:offset + 46 + name_len].decode("utf-8", "surrogateescape")))
        offset += 46 + name_len + extra_len + comment_len
    return entries


def patch_zip(path: Path, member: str, *, flags: int = 0, method: int | None = None, file_size: int | None = None,
              crc: int | None = None, name: bytes | None = None) -> Path:
    """Rewrite header fields of ``member`` in both its central directory entry and its local header."""
    data = bytearray(path.read_bytes())
    (central, local, _), = [e for e in zip_entries(bytes(data)) if e[2] == member]
    for base, flag_at, method_at, crc_at, size_at, name_at in ((central, 8, 10, 16, 24, 46), (local, 6, 8, 14, 22, 30)):
        struct.pack_into("<H", data, base + flag_at, struct.unpack_from("<H", data, base + flag_at)[0] | flags)
        if method is not None:
            struct.pack_into("<H", data, base + method_at, method)
        if crc is not None:
            struct.pack_into("<I", data, base + crc_at, crc)
        if file_size is not None:
            struct.pack_into("<I", data, base + size_at, file_size)
        if name is not None:
            assert len(name) == len(member.encode())
            data[base + name_at:base + name_at + len(name)] = name
    path.write_bytes(bytes(data))
    return path


def refused(archive: Path, tmp_path: Path, *parts: str, **kwargs) -> str:
    """fetch_and_extract(archive) fails with one line naming the archive and ``parts``; nothing is left."""
    target = tmp_path / "out" / "ds"
    with pytest.raises(DataError) as err:
        fetch_and_extract(archive, target, progress=False, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.source: ") and archive.name in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert_nothing_left(tmp_path, target)
    return message


def deflated_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_zip_member_bomb_by_ratio(tmp_path):
    # 20 MiB of zeros deflate to ~20 KiB: 1000:1, refused from the header before anything is written
    archive = deflated_zip(tmp_path / "bomb.zip", {"top/ok.txt": b"ok", "top/zeros.bin": bytes(20 << 20)})
    assert zipfile.ZipFile(archive).getinfo("top/zeros.bin").compress_size < 100_000
    refused(archive, tmp_path, "member 'top/zeros.bin'", "20.0 MiB", "over the limit of 100:1",
            "MAX_COMPRESSION_RATIO")


def test_zip_bomb_of_many_small_members_by_total_ratio(tmp_path):
    # each 1 MiB member is below RATIO_FREE_BYTES, together they expand 40 MiB from ~40 KiB
    archive = deflated_zip(tmp_path / "many.zip", {f"top/z{i:02d}.bin": bytes(1 << 20) for i in range(40)})
    assert archive.stat().st_size < 200_000
    refused(archive, tmp_path, "its members (40.0 MiB declared in all)", "over the limit of 100:1")


def test_small_repetitive_members_are_exempt_from_the_ratio(tmp_path):
    # ~1000:1 each, but at most RATIO_FREE_BYTES in all (the boundary itself passes)
    files = {"top/caption.txt": b"a photo of a digit. " * 50_000, "top/zeros.bin": bytes(RATIO_FREE_BYTES - 1_000_000)}
    archive = deflated_zip(tmp_path / "text.zip", files)
    assert zipfile.ZipFile(archive).getinfo("top/zeros.bin").compress_size * 1000 < RATIO_FREE_BYTES
    fetch_and_extract(archive, tmp_path / "ds", progress=False)
    assert_extracted(tmp_path / "ds", files)


def test_zip_total_size_over_the_budget(tmp_path):
    archive = make_zip(tmp_path / "big.zip", {"top/a.bin": os.urandom(6000), "top/b.bin": os.urandom(6000)})
    refused(archive, tmp_path, "11.7 KiB declared in all", "over the limit of 10.0 KiB", "MAX_EXTRACTED_BYTES",
            budget=ExtractionBudget(10 * 1024))


def test_default_budget_is_max_extracted_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_EXTRACTED_BYTES", 5000)
    archive = make_zip(tmp_path / "big.zip", {"top/a.bin": os.urandom(6000)})
    refused(archive, tmp_path, "over the limit of 4.9 KiB")


def test_zip_header_claiming_a_huge_size_is_refused_before_writing(tmp_path):
    archive = make_zip(tmp_path / "liar.zip", {"top/ok.txt": b"ok", "top/x.bin": b"x" * 1000})
    patch_zip(archive, "top/x.bin", file_size=0xFFFF0000)  # headers say 4 GiB, the data is 1 KB
    refused(archive, tmp_path, "member 'top/x.bin'", "4.0 GiB", "over the limit of 100:1")


def test_zip_header_claiming_a_small_size_stops_at_that_size(tmp_path):
    # headers say 1000 bytes with the CRC of the first 1000; the deflate stream holds 40 MiB: zipfile
    # stops at the declared size, and the bytes written are counted against it
    archive = deflated_zip(tmp_path / "liar.zip", {"top/x.bin": bytes(40 << 20)})
    patch_zip(archive, "top/x.bin", file_size=1000, crc=zlib.crc32(bytes(1000)))
    target = tmp_path / "ds"
    fetch_and_extract(archive, target, progress=False)
    assert (target / "top/x.bin").stat().st_size == 1000
    # the same with the real CRC: zipfile's CRC check refuses the member
    patch_zip(archive, "top/x.bin", crc=zlib.crc32(bytes(40 << 20)))
    refused(archive, tmp_path, "not a valid zip archive", "member 'top/x.bin'", "CRC")


def test_member_yielding_more_than_declared_is_refused(tmp_path):
    from clipprune.data.archive import _Extraction

    root = tmp_path / "root"
    root.mkdir()
    extraction = _Extraction(root, "a.zip", "data.source", "zip", 100, ExtractionBudget())
    with pytest.raises(DataError, match=r"a\.zip: member 'x' holds more data than the 10 bytes its header declares"):
        extraction.write(io.BytesIO(b"y" * 11), ("x",), "x", 10)
    with pytest.raises(DataError, match=r"a\.zip: member 'x' holds 9 bytes, its header declares 10"):
        extraction.write(io.BytesIO(b"y" * 9), ("x",), "x", 10)


@pytest.mark.parametrize("flag", [0x1, 0x40])
def test_zip_encrypted_member(tmp_path, flag):
    archive = patch_zip(make_zip(tmp_path / "secret.zip", {"top/ok.txt": b"ok", "top/s.txt": b"secret"}),
                        "top/s.txt", flags=flag)
    refused(archive, tmp_path, "refusing encrypted member 'top/s.txt'")


def test_zip_unsupported_compression_method(tmp_path):
    archive = patch_zip(make_zip(tmp_path / "aes.zip", {"top/a.txt": b"alpha"}), "top/a.txt", method=99)
    refused(archive, tmp_path, "member 'top/a.txt' uses compression method 99", "deflated")


def zip_with_duplicates(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, and writes them
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


CLASHES = {
    "duplicate": ([("top/a.txt", b"1"), ("top/a.txt", b"2")], "duplicate member 'top/a.txt'"),
    "same_path": ([("top/a.txt", b"1"), ("top//a.txt", b"2")], "both extract to 'top/a.txt'"),
    "dot_part": ([("top/a.txt", b"1"), ("top/./a.txt", b"2")], "both extract to 'top/a.txt'"),
    "case": ([("top/Readme.txt", b"1"), ("top/README.txt", b"2")], "differ only in letter case"),
    "case_folder": ([("Top/a.txt", b"1"), ("top/b.txt", b"2")], "differ only in letter case"),
    "unicode": ([("top/caf\u00e9.txt", b"1"), ("top/cafe\u0301.txt", b"2")], "Unicode normalisation"),
    "file_then_dir": ([("top/x", b"1"), ("top/x/y", b"2")], "'top/x' would be both a file and a directory"),
    "dir_then_file": ([("top/x/", b""), ("top/x", b"2")], "'top/x' would be both a file and a directory"),
}


@pytest.mark.parametrize("case", sorted(CLASHES))
def test_zip_clashing_members(tmp_path, case):
    members, expected = CLASHES[case]
    refused(zip_with_duplicates(tmp_path / "clash.zip", members), tmp_path, expected)


@pytest.mark.parametrize("case", ["duplicate", "case", "unicode", "file_then_dir"])
def test_tar_clashing_members(tmp_path, case):
    members, expected = CLASHES[case]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    archive = tmp_path / "clash.tar"
    archive.write_bytes(buf.getvalue())
    refused(archive, tmp_path, expected)


def test_repeated_directory_entries_are_fine(tmp_path):
    archive = zip_with_duplicates(tmp_path / "dirs.zip", [("top/", b""), ("top/a.txt", b"1"), ("top/", b"")])
    fetch_and_extract(archive, tmp_path / "ds", progress=False)
    assert_extracted(tmp_path / "ds", {"top/a.txt": b"1"})


NAMES = {
    "long_part": ("top/" + "n" * 300 + ".txt", "is 304 bytes, the filesystem holds at most 255"),
    "long_path": ("top/" + "/".join(["d" * 200] * 25) + "/f.txt", "its path would be"),
    "control": ("top/a\nb.txt", "contains a control character"),
    "drive": ("C:/evil.txt", "absolute path"),
    "empty": (".", "refusing file member with an empty name"),
}


@pytest.mark.parametrize("case", sorted(NAMES))
def test_zip_member_names_the_filesystem_cannot_hold(tmp_path, case):
    member, expected = NAMES[case]
    archive = make_zip(tmp_path / "names.zip", {"top/ok.txt": b"ok", member: b"x"})
    refused(archive, tmp_path, expected)


@pytest.mark.parametrize("case", ["long_part", "long_path", "control"])
def test_tar_member_names_the_filesystem_cannot_hold(tmp_path, case):
    member, expected = NAMES[case]
    archive = make_tar(tmp_path / "names.tar", {"top/ok.txt": b"ok", member: b"x"})  # GNU/pax long names
    refused(archive, tmp_path, expected)


def test_zip_member_name_with_nul(tmp_path):
    # zipfile cuts names at NUL ("top/a" here): the name as stored is what is checked
    archive = patch_zip(make_zip(tmp_path / "nul.zip", {"top/aXb.txt": b"1"}), "top/aXb.txt", name=b"top/a\0b.txt")
    assert zipfile.ZipFile(archive).namelist() == ["top/a"]
    refused(archive, tmp_path, "refusing member whose name contains a NUL byte: 'top/a\\x00b.txt'")


def test_tar_member_name_with_nul(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("top/ab")
        info.size, info.pax_headers = 1, {"path": "top/a\0b"}
        tf.addfile(info, io.BytesIO(b"1"))
    archive = tmp_path / "nul.tar"
    archive.write_bytes(buf.getvalue())
    refused(archive, tmp_path, "contains a NUL byte: 'top/a\\x00b'")


def test_filesystem_errors_while_writing_name_the_member(tmp_path, monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith("b.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    archive = make_zip(tmp_path / "disk.zip", FILES)
    refused(archive, tmp_path, "cannot extract member 'top/sub/b.bin': No space left on device")


@pytest.mark.parametrize("file_type, kind", [(stat.S_IFIFO, "FIFO"), (stat.S_IFCHR, "character device"),
                                             (stat.S_IFBLK, "block device"), (stat.S_IFSOCK, "socket")])
def test_zip_special_file_members(tmp_path, file_type, kind):
    archive = tmp_path / "special.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/ok.txt", b"ok")
        info = zipfile.ZipInfo("top/dev")
        info.create_system, info.external_attr = 3, (file_type | 0o644) << 16
        zf.writestr(info, b"")
    refused(archive, tmp_path, f"refusing special file member 'top/dev' ({kind})")


def test_zip_directory_member_with_data(tmp_path):
    archive = tmp_path / "dirdata.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("top/d/"), b"hidden")
    refused(archive, tmp_path, "directory member 'top/d/' holds 6 bytes of data")


def test_zip_directory_mode_on_a_file_name(tmp_path):
    archive = tmp_path / "dirmode.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("top/d")
        info.create_system, info.external_attr = 3, (stat.S_IFDIR | 0o755) << 16
        zf.writestr(info, b"x")
    refused(archive, tmp_path, "member 'top/d' is marked as a directory but named as a file")


# ---------------------------------------------------------------- member-level problems (tar)

@pytest.mark.parametrize("kind, label", [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"),
                                         (b"Z", "unknown tar type b'Z'")])
def test_tar_devices_and_unknown_types(tmp_path, kind, label):
    device = tarfile.TarInfo("top/dev")
    device.type, device.devmajor, device.devminor = kind, 1, 3
    archive = make_tar(tmp_path / "dev.tar", {"top/ok.txt": b"ok"}, links=[device])
    refused(archive, tmp_path, f"refusing special file member 'top/dev' ({label})")


def test_tar_gz_bomb_by_ratio(tmp_path):
    archive = make_tar(tmp_path / "bomb.tar.gz", {"top/ok.txt": b"ok", "top/zeros.bin": bytes(40 << 20)})
    assert archive.stat().st_size < 100_000
    refused(archive, tmp_path, "member 'top/zeros.bin' (40.0 MiB)", "over the limit of 100:1")


def test_tar_header_claiming_a_huge_size_is_refused_before_reading(tmp_path):
    huge = tarfile.TarInfo("top/huge")
    huge.size = 100 << 30
    ok = tarfile.TarInfo("top/ok.txt")
    ok.size = 2
    archive = tmp_path / "liar.tar"
    archive.write_bytes(ok.tobuf(tarfile.GNU_FORMAT) + b"ok".ljust(512, b"\0") + huge.tobuf(tarfile.GNU_FORMAT)
                        + bytes(1024))
    refused(archive, tmp_path, "member 'top/huge' (100.0 GiB)", "over the limit")


def test_tar_total_size_over_the_budget(tmp_path):
    archive = make_tar(tmp_path / "big.tar", {"top/a.bin": os.urandom(6000), "top/b.bin": os.urandom(6000)})
    refused(archive, tmp_path, "member 'top/b.bin' (5.9 KiB) would bring the extracted data to 11.7 KiB",
            "over the limit of 10.0 KiB", budget=ExtractionBudget(10 * 1024))


def good_tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("top/a.txt", b"a" * 700), ("top/b.txt", b"b" * 10)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_cut_at_a_member_boundary(tmp_path):
    # header + 2 data blocks of top/a.txt: tarfile alone would stop quietly with one member
    archive = tmp_path / "cut.tar"
    archive.write_bytes(good_tar_bytes()[:1536])
    refused(archive, tmp_path, "not a valid tar archive", "without an end-of-archive block")


def test_tar_corrupt_header_after_a_good_member(tmp_path):
    data = bytearray(good_tar_bytes())
    data[1536 + 100:1536 + 108] = b"garbage!"  # the second header's mode field: its checksum fails
    archive = tmp_path / "badheader.tar"
    archive.write_bytes(bytes(data))
    refused(archive, tmp_path, "not a valid tar archive", "unreadable member header at byte 1536")


def test_tar_members_hidden_after_the_end_of_archive(tmp_path):
    archive = tmp_path / "hidden.tar"
    archive.write_bytes(good_tar_bytes() + make_tar(tmp_path / "second.tar", {"top/c.txt": b"c"}).read_bytes())
    refused(archive, tmp_path, "not a valid tar archive", "data after the end-of-archive block")


def test_tar_gz_checksum_is_verified(tmp_path):
    data = bytearray(make_tar(tmp_path / "ok.tar.gz", FILES).read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC32: only reading the stream to its end sees it
    archive = tmp_path / "crc.tar.gz"
    archive.write_bytes(bytes(data))
    refused(archive, tmp_path, "not a valid tar archive", "CRC check failed")
