"""Atomic file outputs: a reader never sees a half-written file, a killed run leaves none.

Every writer goes to a temporary file in the destination's directory, flushes
and fsyncs it, then renames it over the destination (atomic on POSIX).

Byte-stable outputs: the same content gives the same bytes in every process, so a
resume that compares checksums does not redo finished work. JSON is written with
sorted keys; safetensors files go through ``safetensors_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then move it to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise naming(error, path) from None
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        raise naming(error, path) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def naming(error: OSError, path: Path) -> OSError:
    """``error`` about ``path``: the temporary file's name means nothing to a user (a read-only
    directory, a full disk), and a write on a descriptor names no file at all. Same class and errno."""
    return type(error)(error.errno, error.strerror or str(error), str(path))


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (weights and pools can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` (made contiguous, on the CPU) and ``metadata``, byte-stable.

    Measured with safetensors 0.8: the tensor entries and the data come out in the same
    order every time (the library sorts them by dtype, then name), but the ``__metadata__``
    keys come out in a different order in each process, even with the same PYTHONHASHSEED
    (the Rust side keeps them in a HashMap with a per-process random seed). So the header
    that safetensors wrote is re-encoded here with the metadata keys sorted; the data
    section is kept as it is (its offsets are relative to its start, so they still hold).
    """
    from safetensors.torch import save

    ordered = {name: tensors[name].detach().cpu().contiguous() for name in sorted(tensors)}
    raw = save(ordered, metadata=None if metadata is None else dict(metadata))
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    return _safetensors_header(header) + raw[8 + header_length :]


def _safetensors_header(header: dict) -> bytes:
    """The length prefix and JSON header, padded with spaces to 8 bytes as safetensors does (keeps data aligned)."""
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded
