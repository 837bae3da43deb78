"""Atomic, reproducible file output: write to a temporary sibling, rename on success, remove on failure.

Temporaries are named ``.<target name>.<writer pid>.<random>.tmp`` next to the target (never inside a DVC
output). A writer killed by SIGKILL cannot remove its temporary; the next write of the same target removes
those whose writer process no longer exists.

A stage with several outputs writes them inside ``commit_together()``: each ``atomic_path`` / ``atomic_dir``
there keeps its finished temporary, and only when the whole block succeeds are they all renamed into place
(all of them, or, if a rename fails, none: those already renamed are put back). An output that cannot be
written (read-only directory, full disk, a file where a folder should be) is an ``OutputError`` naming the
directory.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import shutil
import struct
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .errors import ClipPruneError, DataError, OutputError

# errno values that mean "this output cannot be written here", not a bug: turned into one OutputError line
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
                  errno.EISDIR, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process, or a number that is no pid: leave the file alone
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``target`` left by writers that died before cleaning up; return them."""
    target = Path(target)
    if os.name != "posix" or not target.parent.is_dir():  # os.kill(pid, 0) is no existence check elsewhere
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or _writer_alive(int(match[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _is_output_error(err: OSError, directory: Path) -> bool:
    """An OSError of writing under ``directory`` (not, say, of reading an input inside the block)."""
    if err.errno not in _OUTPUT_ERRNOS:
        return False
    if err.filename is None:  # write()/close() errors carry no file name
        return True
    try:
        Path(os.path.abspath(err.filename)).relative_to(os.path.abspath(directory))
    except ValueError:
        return os.path.abspath(err.filename) in {os.path.abspath(p) for p in directory.parents}
    return True


@contextlib.contextmanager
def _output_errors(target: Path) -> Iterator[None]:
    """OSErrors of writing ``target`` -> one OutputError line naming its directory."""
    try:
        yield
    except OSError as err:
        if not _is_output_error(err, target.parent):
            raise
        why = err.strerror or type(err).__name__
        if err.errno in (errno.EEXIST, errno.ENOTDIR):
            why += "; a file is in the way of a folder"
        raise OutputError(f"{target.parent}: cannot write {target.name} there ({why}); is the output directory "
                          f"read-only or the disk full?") from None


_GROUP = threading.local()  # ``staged``: {target: finished temporary} of the open commit_together block


def _staging(target: Path | None = None) -> dict | None:
    """The open group's staged outputs; None outside a group, or for a ``target`` inside a temporary of this
    process (e.g. a file of an ``atomic_dir`` being written): that one is private until its folder is renamed."""
    group = getattr(_GROUP, "staged", None)
    if group is None or target is None:
        return group
    mine = f".{os.getpid()}."
    inside = any(part.startswith(".") and part.endswith(".tmp") and mine in part for part in target.parent.parts)
    return None if inside else group


def staged(target: str | os.PathLike) -> Path:
    """Where ``target`` can be read now: its finished temporary inside ``commit_together``, else ``target``."""
    group = _staging()
    return Path(group.get(Path(target), target)) if group is not None else Path(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _stage(target: Path, tmp: Path) -> None:
    group = _staging()
    earlier = group.pop(target, None)
    if earlier is not None:  # written twice in the block: the later write wins
        _remove(earlier)
    group[target] = tmp


def _commit_all(staged_outputs: dict[Path, Path]) -> None:
    """Rename every temporary onto its target; if one rename fails, undo the others (old outputs back)."""
    moved_aside, done = [], []
    try:
        for target, tmp in staged_outputs.items():
            with _output_errors(target):
                if target.exists() or target.is_symlink():
                    aside = target.with_name(f"{_temp_prefix(target)}{secrets.token_hex(4)}.tmp")
                    os.replace(target, aside)
                    moved_aside.append((target, aside))
                os.replace(tmp, target)
                done.append(target)
    except BaseException:
        for target in reversed(done):
            _remove(target)
        for target, aside in reversed(moved_aside):
            os.replace(aside, target)
        for tmp in staged_outputs.values():
            _remove(tmp)
        raise
    for _, aside in moved_aside:
        _remove(aside)


@contextlib.contextmanager
def commit_together() -> Iterator[None]:
    """Outputs written by ``atomic_path`` / ``atomic_dir`` inside the block appear together, or not at all.

    They are renamed into place when the block ends without an exception (``staged(target)`` reads one
    back before that); on an exception every temporary is removed and the previous outputs stay as they
    were. A block nested in another joins the outer one.
    """
    if _staging() is not None:
        yield
        return
    _GROUP.staged = {}
    try:
        yield
        group, _GROUP.staged = _GROUP.staged, None
        _commit_all(group)
    finally:
        for tmp in (_staging() or {}).values():
            _remove(tmp)
        _GROUP.staged = None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    with _output_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _output_errors(target):
            yield tmp_path
            if tmp_path.exists():  # mkstemp makes owner-only files; give the output the usual umask mode
                os.chmod(tmp_path, 0o666 & ~_umask())
            if _staging(target) is not None:
                _stage(target, tmp_path)
                return
            os.replace(tmp_path, target)
    finally:
        if _staging(target) is None or _staging(target).get(target) != tmp_path:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    with _output_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _output_errors(target):
            yield tmp_path
            os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp makes an owner-only directory
            if _staging(target) is not None:
                _stage(target, tmp_path)
                return
            _commit_all({target: tmp_path})  # the old directory is moved aside, then removed
    finally:
        if (_staging(target) is None or _staging(target).get(target) != tmp_path) and tmp_path.exists():
            shutil.rmtree(tmp_path)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write JSON atomically (sorted keys so identical content gives identical bytes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")


# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec)
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def safetensors_bytes(tensors: Mapping, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``tensors`` in the safetensors format with a byte-stable header.

    ``safetensors.torch.save_file`` writes the metadata in hash-map order, so the same content can give
    different bytes from run to run; here every key is sorted, so equal content always gives equal bytes
    (DVC hashes and determinism checks rely on that). Tensors are laid out by descending item size, then
    name, so every offset stays aligned to its dtype.
    """
    import torch

    entries = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        dtype = _SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        entries.append((str(name), dtype, tensor.detach().to("cpu").contiguous()))
    entries.sort(key=lambda e: (-e[2].element_size(), e[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name, dtype, tensor in entries:
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data buffer starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def save_safetensors(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` atomically, with reproducible bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, metadata))


FLOATING = "a floating-point dtype"  # in ``read_safetensors(dtypes=...)``: any of float16/bfloat16/float32/float64


def _dtype_allowed(dtype, allowed) -> bool:
    if allowed == FLOATING:
        return dtype.is_floating_point and dtype.itemsize >= 2  # not the 8-bit float formats
    return dtype in (allowed if isinstance(allowed, (tuple, list, set, frozenset)) else (allowed,))


def _allowed_for(key: str, dtypes: Mapping):
    if key in dtypes:
        return dtypes[key]
    return next((allowed for pattern, allowed in dtypes.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _dtype_names(allowed) -> str:
    if allowed == FLOATING:
        return allowed
    names = [str(d).removeprefix("torch.") for d in (allowed if isinstance(allowed, (tuple, list)) else (allowed,))]
    return " or ".join(names)


def read_safetensors(path: str | os.PathLike, *, error: type[ClipPruneError] = DataError,
                     unreadable: str = "not a readable safetensors file", dtypes: Mapping | None = None,
                     suffix: str = "", keys: Callable[[str], bool] | None = None) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, validated; never unpickles (safetensors holds no code).

    Every problem is one line, ``error(f"{path}: ...{suffix}")``: the path is not a regular file; a header
    the safetensors library refuses (empty or truncated file, header length beyond the file or above the
    library's 100 MB cap, invalid JSON, unknown dtype names, negative or overflowing shapes, offsets that
    do not tile the data); or a tensor whose dtype ``dtypes`` does not allow. ``dtypes`` maps a tensor name,
    or an ``fnmatch`` pattern of names, to the allowed dtype(s) or ``FLOATING``; the exact name is looked
    up first, then the patterns in order; a tensor no entry matches is refused too (list ``"*"`` last to
    accept the rest). ``keys``: read only the tensors whose name it accepts. A tensor's data is read only when the whole file checks out structurally, and a file
    holds no more data than its size: nothing here allocates more than the file's bytes.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {unreadable} (not a regular file){suffix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if keys is None or keys(key)}
    except Exception as err:  # safetensors raises its own error type (SafetensorError), OSError, ...
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise error(f"{path}: {unreadable} ({detail}){suffix}") from None
    for key, tensor in tensors.items() if dtypes is not None else ():
        allowed = _allowed_for(key, dtypes)
        if allowed is None:
            raise error(f"{path}: unexpected tensor {key!r}{suffix}")
        if not _dtype_allowed(tensor.dtype, allowed):
            raise error(f"{path}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                        f"{_dtype_names(allowed)}{suffix}")
    return tensors, metadata
