"""Checkpoint files in a folder: ``stage{S}-step{N:08d}.pt``, written atomically, the
last ``keep`` per stage kept.

The durable state of a stage is small and changes only at outer steps (global params,
outer optimizer momentum, data position), so a stage host writes all of it at every
outer step to a local folder and, when configured, a shared one.

Why write to a temp file, fsync, ``os.replace``, fsync the folder
(:func:`distqat.fileio.write_atomic`): ``os.replace`` is atomic, so the final name points
either to the previous file or to the complete new one, never to a half-written one.
Without the fsync of the file, a power loss after the rename can leave the new name
pointing at blocks never written; without the fsync of the folder the rename itself may be
lost, and a pruned older file with it.

What a kill (SIGKILL, power loss, OOM) at any moment leaves behind:

* before or during the write of the temp file: a partial ``.stage{S}-step{N}.pt.*.tmp``.
  Its name does not match ``stage{S}-step{N:08d}.pt``, so no loader ever looks at it; the
  next save of that stage removes it once its writer is known dead (same host, pid gone)
  or it is older than :data:`STALE_TMP_S` (another host).
* after the fsync, before the rename: a complete temp file, ignored and removed the same way.
* after the rename: the new checkpoint, complete and fsynced; the previous ones are still
  there because pruning happens only after a successful rename.
* during pruning: some extra older files, removed by the next save.

So a file that a loader accepts is always one whose header, length and sha256 matched
(:mod:`distqat.checkpoint.format`): never a partial one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from .. import faults, fileio
from .format import CheckpointError, PathLike, encode, load_verified, verify

logger = logging.getLogger(__name__)

STALE_TMP_S = 900.0
"""A temp file of another host, or of a pid we cannot check, is considered abandoned
once its mtime is this old (seconds). A live writer touches its file at every write."""

_NAME_RE = re.compile(r"^stage(?P<stage>\d+)-step(?P<step>\d+)\.pt$")
_TMP_RE = re.compile(
    r"^\.stage(?P<stage>\d+)-step(?P<step>\d+)\.pt\."
    r"(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.tmp$"
)

# Names of temp files being written by this process right now (unique: pid + random
# token): never cleaned up as leftovers.
_in_flight: set = set()
_in_flight_lock = threading.Lock()


def checkpoint_path(folder: PathLike, stage: int, outer_step: int) -> Path:
    """The final path of the checkpoint of ``stage`` at ``outer_step`` in ``folder``."""
    return Path(folder) / f"stage{stage}-step{outer_step:08d}.pt"


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_path(final: Path) -> Path:
    token = secrets.token_hex(4)
    return final.parent / f".{final.name}.{_host_tag()}.{os.getpid()}.{token}.tmp"


def write_atomic(path: PathLike, data: bytes) -> None:
    """:func:`distqat.fileio.write_atomic` with a temp name that :func:`cleanup` can tell
    apart from a live writer's (host, pid, token), registered while it is written."""
    path = Path(path)
    tmp = _tmp_path(path)
    with _in_flight_lock:
        _in_flight.add(tmp.name)
    try:
        fileio.write_atomic(path, data, tmp=tmp, before_replace=_checkpoint_fault)
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp.name)


def _checkpoint_fault() -> None:
    faults.point("checkpoint")


def save_atomic(path: PathLike, obj: Any) -> None:
    """Serialize ``obj`` (see :func:`encode`) and write it with :func:`write_atomic`."""
    write_atomic(path, encode(obj))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or cannot tell: leave it to the age rule
    return True


def _is_abandoned_tmp(entry: Path, m: "re.Match[str]", now: float) -> bool:
    with _in_flight_lock:
        if entry.name in _in_flight:
            return False
    try:
        age = now - entry.stat().st_mtime
    except OSError:
        return False  # gone already
    if age > STALE_TMP_S:
        return True
    if m["host"] != _host_tag():
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return True  # ours but not in flight: left by a failed write
    return not _pid_alive(pid)


def cleanup(folder: PathLike, stage: int, keep: int, *, protect: Optional[int] = None) -> None:
    """Delete checkpoints of ``stage`` beyond the newest ``keep`` and abandoned temp files.

    ``protect`` (a step) is never deleted: the file just written, even if a concurrent
    writer has already put newer ones beside it. Only names that match
    ``stage{S}-step*.pt`` or this module's temp pattern for ``stage`` are touched.
    """
    folder = Path(folder)
    steps = list_checkpoints(folder, stage)
    for step in steps[:-keep] if keep > 0 else steps:
        if step == protect:
            continue
        try:
            checkpoint_path(folder, stage, step).unlink()
        except FileNotFoundError:
            pass  # pruned by a concurrent writer
        except OSError as e:
            logger.warning("cannot remove old checkpoint %s: %s",
                           checkpoint_path(folder, stage, step), e)
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None or int(m["stage"]) != stage or not _is_abandoned_tmp(entry, m, now):
            continue
        try:
            entry.unlink()
            logger.info("removed abandoned temp file %s", entry)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("cannot remove abandoned temp file %s: %s", entry, e)


def _save_encoded(folder: PathLike, stage: int, outer_step: int, data: bytes, keep: int) -> Path:
    path = checkpoint_path(folder, stage, outer_step)
    write_atomic(path, data)
    cleanup(folder, stage, keep, protect=outer_step)
    return path


def save(folder: PathLike, stage: int, outer_step: int, state: Any, *, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``stage`` at ``outer_step``; keep the last ``keep``.

    Synchronous; returns the final path. Older files of the stage beyond ``keep`` and
    abandoned temp files are removed only after the new file is in place.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return _save_encoded(folder, stage, outer_step, encode(state), keep)


# --------------------------------------------------------------------------- reading


def list_checkpoints(folder: PathLike, stage: int) -> List[int]:
    """Outer steps of ``stage`` with a complete-named file in ``folder``, ascending.

    Not verified: this only lists names (cheap, for telling peers what we hold). Temp
    files are never listed. A missing folder gives ``[]``.
    """
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    steps = []
    for name in names:
        m = _NAME_RE.match(name)
        if m is not None and int(m["stage"]) == stage:
            steps.append(int(m["step"]))
    return sorted(set(steps))


def latest(folder: PathLike, stage: int) -> Optional[Tuple[int, Path]]:
    """``(outer_step, path)`` of the newest checkpoint of ``stage`` that verifies, or None.

    Verifies magic, length and sha256 (reads every byte) but does not unpickle. Each file
    that fails is logged as a warning naming it, and the previous one is tried.
    """
    for step in reversed(list_checkpoints(folder, stage)):
        path = checkpoint_path(folder, stage, step)
        try:
            verify(path)
        except CheckpointError as e:
            logger.warning("skipping damaged checkpoint: %s", e)
            continue
        return step, path
    return None


def load_latest(folder: PathLike, stage: int) -> Optional[Tuple[int, Any]]:
    """``(outer_step, state)`` from the newest checkpoint of ``stage`` that loads, or None.

    Newest first; a file that fails verification or unpickling is logged as a warning
    naming it, and the previous one is tried. None means no usable file (the warnings say
    why): the caller decides whether that is an error (it is once training has started).
    """
    for step in reversed(list_checkpoints(folder, stage)):
        path = checkpoint_path(folder, stage, step)
        try:
            return step, load_verified(path)
        except CheckpointError as e:
            logger.warning("skipping damaged checkpoint: %s", e)
    return None

