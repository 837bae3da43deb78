"""Atomic, reproducible file output: write to a temporary sibling, rename on success, remove on failure.

Temporaries are named ``.<target name>.<writer pid>.<random>.tmp`` next to the target (never inside a DVC
output). A writer killed by SIGKILL cannot remove its temporary; the next write of the same target removes
those whose writer process no longer exists.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping


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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes owner-only files; give the output the usual umask mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp makes an owner-only directory
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp_path, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
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
