"""fetch_and_extract: good archives, checksum, corrupt and unsafe archives, URLs."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from clipprune.data.archive import COCO2017_ARCHIVES, fetch_and_extract, sha256_file
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
