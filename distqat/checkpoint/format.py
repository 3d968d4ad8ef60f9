"""The checkpoint file format: a 52-byte header, then the payload::

    magic  8 bytes  b"DQATCKPT"
    version         uint32, little-endian
    length          uint64, little-endian: payload bytes
    sha256 32 bytes of the payload
    payload         torch.save() of the state (zip format), loaded with weights_only=True

Why a checksum: the atomic rename (:mod:`distqat.checkpoint.store`) protects against our
own crashes, not against everything else. A file copied by hand, a shared (NFS) folder
that returns short reads, a disk that flips a bit, or a file truncated by a full disk
elsewhere would otherwise unpickle into wrong weights, or fail deep in ``torch.load`` with
an unhelpful message. The length and sha256 in the header turn all of these into one
:class:`CheckpointError` naming the file, and the loaders then fall back to the previous
step. ``weights_only=True``: a file carrying a pickled object is refused, not run.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Union

import torch

MAGIC = b"DQATCKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
HEADER_SIZE = _HEADER.size  # 52

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a file failed verification.

    The message always names the file (or folder) involved.
    """



def hash_tensors(h: "hashlib._Hash", tensors: Mapping[str, torch.Tensor]) -> None:
    """Feed ``tensors`` (names, dtypes, shapes and bytes, in name order) to ``h``: equal
    digests mean bit-identical tensors."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors (see :func:`hash_tensors`), in hex."""
    h = hashlib.sha256()
    hash_tensors(h, tensors)
    return h.hexdigest()


def encode(obj: Any) -> bytes:
    """Serialize ``obj`` with ``torch.save`` and prepend the verification header."""
    buf = io.BytesIO()
    buf.write(b"\0" * HEADER_SIZE)
    torch.save(obj, buf)
    view = buf.getbuffer()
    payload = view[HEADER_SIZE:]
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    view[:HEADER_SIZE] = header
    del payload, view
    return buf.getvalue()


def _read_verified_payload(path: Path) -> bytes:
    """Return the payload of ``path`` after checking magic, version, length and sha256."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
            payload = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read: {e}") from e
    if len(header) < HEADER_SIZE:
        raise CheckpointError(f"checkpoint {path}: truncated header ({len(header)} bytes)")
    magic, version, length, digest = _HEADER.unpack(header)
    if magic != MAGIC:
        raise CheckpointError(f"checkpoint {path}: bad magic {magic!r}, not a distqat checkpoint")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version}, this code reads {FORMAT_VERSION}"
        )
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path}: payload is {len(payload)} bytes, header says {length} "
            "(truncated or altered)"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: sha256 mismatch (corrupted or altered)")
    return payload


def verify(path: PathLike) -> None:
    """Raise :class:`CheckpointError` unless the header, length and sha256 of ``path`` match."""
    _read_verified_payload(Path(path))


def load_verified(path: PathLike) -> Any:
    """Verify ``path`` and load it with ``torch.load(weights_only=True)`` onto the CPU.

    Raises :class:`CheckpointError` naming the file if it fails verification or cannot
    be unpickled.
    """
    path = Path(path)
    payload = _read_verified_payload(path)
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path}: verified but cannot be loaded: {e}") from e

