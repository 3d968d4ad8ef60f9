"""Atomic file writes: the one way distqat replaces a file that someone may be reading.

A reader (a status command, TensorBoard, the next round, ``distqat.export``) must see the
old file or the complete new one, never half of one. So every write goes to a temp file
in the same folder, is fsynced, and is renamed over the target (``os.replace`` is atomic
within a filesystem); the folder is fsynced too, so that the rename survives a power
loss. Torch-free, so that the config and the history can use it without importing torch.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Union

PathLike = Union[str, os.PathLike]


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened everywhere; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: Union[bytes, str], *, tmp: Optional[Path] = None,
                 durable: bool = True,
                 before_replace: Optional[Callable[[], None]] = None) -> Path:
    """Replace ``path`` with ``data`` atomically (parents created). ``tmp`` names the temp
    file when the caller tracks its own (the checkpoint store cleans up abandoned ones);
    by default a hidden unique name beside ``path``. On failure the temp file is removed.
    ``durable=False`` skips the fsyncs: still atomic for readers, but a power loss may
    lose it (for progress files rewritten every few seconds). ``before_replace`` runs
    between the write and the rename (the chaos tests kill a host there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def torch_save(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` written atomically (torch imported only here)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_atomic(path, buf.getvalue())


def write_json(path: PathLike, data: Any, *, durable: bool = True) -> Path:
    """``data`` as indented, key-sorted JSON, written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n",
                        durable=durable)


def read_json(path: PathLike) -> Optional[Any]:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
