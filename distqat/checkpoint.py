"""Durable per-stage DiLoCo state, written at every outer step.

The durable state of a stage is small and changes only at outer steps (global params,
outer optimizer momentum, data position), so a stage host writes all of it at every
outer step to ``stage{S}-step{N:08d}.pt`` in a local folder and, when configured, in a
shared one, keeping the last ``keep`` files per stage.

File format (version 1): a 52-byte header, then the payload::

    magic  8 bytes  b"DQATCKPT"
    version         uint32, little-endian
    length          uint64, little-endian: payload bytes
    sha256 32 bytes of the payload
    payload         torch.save() of the state (zip format), loaded with weights_only=True

Why write to a temp file, fsync, ``os.replace``, fsync the folder: ``os.replace`` is
atomic, so the final name points either to the previous file or to the complete new
one, never to a half-written one. Without the fsync of the file, a power loss after the
rename can leave the new name pointing at blocks never written (zeros or garbage); without
the fsync of the folder the rename itself may be lost, and a pruned older file with it.

Why a checksum: the rename protects against our own crashes, not against everything
else. A file copied by hand, a shared (NFS) folder that returns short reads, a disk that
flips a bit, or a file truncated by a full disk elsewhere would otherwise unpickle into
wrong weights, or fail deep in ``torch.load`` with an unhelpful message. The length and
sha256 in the header turn all of these into one :class:`CheckpointError` naming the file,
and the loaders then fall back to the previous step.

What a kill (SIGKILL, power loss, OOM) at any moment leaves behind:

* before or during the write of the temp file: a partial ``.stage{S}-step{N}.pt.*.tmp``.
  Its name does not match ``stage{S}-step{N:08d}.pt``, so no loader ever looks at it; the
  next save of that stage removes it once its writer is known dead (same host, pid gone)
  or it is older than :data:`STALE_TMP_S` (another host).
* after the fsync, before the rename: a complete temp file, ignored and removed the same way.
* after the rename: the new checkpoint, complete and fsynced; the previous ones are still
  there because pruning happens only after a successful rename.
* during pruning: some extra older files, removed by the next save.

So a file that a loader accepts is always one whose header, length and sha256 matched:
never a partial one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

MAGIC = b"DQATCKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
HEADER_SIZE = _HEADER.size  # 52

STALE_TMP_S = 900.0
"""A temp file of another host, or of a pid we cannot check, is considered abandoned
once its mtime is this old (seconds). A live writer touches its file at every write."""

DEFAULT_TIMEOUT_S = 300.0

_NAME_RE = re.compile(r"^stage(?P<stage>\d+)-step(?P<step>\d+)\.pt$")
_TMP_RE = re.compile(
    r"^\.stage(?P<stage>\d+)-step(?P<step>\d+)\.pt\."
    r"(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.tmp$"
)

PathLike = Union[str, os.PathLike]

# Names of temp files being written by this process right now (unique: pid + random
# token): never cleaned up as leftovers.
_in_flight: set = set()
_in_flight_lock = threading.Lock()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a file failed verification.

    The message always names the file (or folder) involved.
    """


def checkpoint_path(folder: PathLike, stage: int, outer_step: int) -> Path:
    """The final path of the checkpoint of ``stage`` at ``outer_step`` in ``folder``."""
    return Path(folder) / f"stage{stage}-step{outer_step:08d}.pt"


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_path(final: Path) -> Path:
    token = secrets.token_hex(4)
    return final.parent / f".{final.name}.{_host_tag()}.{os.getpid()}.{token}.tmp"


# --------------------------------------------------------------------------- encoding


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


# --------------------------------------------------------------------------- writing


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either absent/old or complete.

    Temp file in the same folder, fsync, ``os.replace``, fsync of the folder. The folder
    is created if missing. On any failure the temp file is removed and the error raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with _in_flight_lock:
        _in_flight.add(tmp.name)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp.name)


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


# --------------------------------------------------------------------------- writer


def snapshot(obj: Any, _where: str = "state") -> Any:
    """A copy of ``obj`` whose tensors are detached CPU copies sharing nothing with it.

    Containers (dict, list, tuple) are rebuilt; leaves must be types that
    ``torch.load(weights_only=True)`` accepts, otherwise ``TypeError`` names the key
    path (e.g. ``state['data_position']['offset']`` holding a numpy integer).
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        # .to("cpu") already copies a device tensor; a CPU tensor needs an explicit clone.
        return t.clone() if t.device.type == "cpu" else t.to("cpu")
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{_where}: key {k!r} of type {type(k).__name__} "
                                "cannot be checkpointed; use str or int keys")
            out[k] = snapshot(v, f"{_where}[{k!r}]")
        return out
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
        return obj
    if isinstance(obj, (torch.dtype, torch.device)):
        return obj
    raise TypeError(f"{_where}: value of type {type(obj).__name__} cannot be loaded with "
                    "weights_only=True; convert it to a tensor or a Python scalar")


class CheckpointWriter:
    """Writes a stage's checkpoints in one background thread, to every given folder.

    :meth:`submit` copies the tensors to CPU synchronously (the only part that stalls
    training), then serialization and writes happen in a single worker thread, so files
    appear in submit order. At most one submit waits behind the write in progress: a
    newer submit *replaces* a pending one that has not started (only the newest state
    matters; a warning says the writes are slower than the outer steps). The newest
    submitted state is never dropped.

    Every folder gets the same bytes; a failing folder (e.g. a shared one that is down)
    does not stop the others. Errors are logged when they happen and raised, once, by the
    next :meth:`flush` or :meth:`close`. The thread is a daemon so that a hung write
    cannot keep a dying process alive; the atomic rename makes that safe.
    """

    def __init__(self, folders: Sequence[PathLike], stage: int, keep: int) -> None:
        if not folders:
            raise ValueError("folders must name at least one folder")
        if stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folders: List[Path] = [Path(f) for f in folders]
        self.stage = stage
        self.keep = keep
        self.last_written: Optional[int] = None
        """Outer step of the last state written to every folder, or None."""
        self._cv = threading.Condition()
        self._pending: Optional[Tuple[int, Any]] = None
        self._busy: Optional[int] = None  # step being written
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"checkpoint-writer-stage{stage}", daemon=True
        )
        self._thread.start()

    def submit(self, outer_step: int, state: Dict[str, Any]) -> None:
        """Copy ``state`` to CPU now and queue it to be written as ``outer_step``."""
        copy = snapshot(state)
        with self._cv:
            if self._closed:
                raise RuntimeError(f"CheckpointWriter for stage {self.stage} is closed")
            if self._pending is not None:
                logger.warning(
                    "checkpoint of stage %d step %d replaced by step %d before it was "
                    "written: writes are slower than outer steps",
                    self.stage, self._pending[0], outer_step,
                )
            self._pending = (outer_step, copy)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                step, state = self._pending
                self._pending = None
                self._busy = step
            error = self._write(step, state)
            del state
            with self._cv:
                self._busy = None
                if error is None:
                    self.last_written = step
                elif self._error is None:
                    self._error = error
                self._cv.notify_all()

    def _write(self, step: int, state: Any) -> Optional[BaseException]:
        t0 = time.monotonic()
        try:
            data = encode(state)
        except Exception as e:  # noqa: BLE001 - reported on flush
            logger.error("checkpoint of stage %d step %d: cannot serialize: %s",
                         self.stage, step, e)
            err = CheckpointError(f"checkpoint of stage {self.stage} step {step}: "
                                  f"cannot serialize: {e}")
            err.__cause__ = e
            return err
        failures = []
        for folder in self.folders:
            try:
                _save_encoded(folder, self.stage, step, data, self.keep)
            except Exception as e:  # noqa: BLE001 - try the other folders, report on flush
                logger.error("checkpoint of stage %d step %d: cannot write to %s: %s",
                             self.stage, step, folder, e)
                failures.append((folder, e))
        if failures:
            msg = "; ".join(f"{folder}: {e}" for folder, e in failures)
            err = CheckpointError(f"checkpoint of stage {self.stage} step {step} failed: {msg}")
            err.__cause__ = failures[0][1]
            return err
        logger.debug("checkpoint of stage %d step %d: %d bytes to %d folder(s) in %.2fs",
                     self.stage, step, len(data), len(self.folders), time.monotonic() - t0)
        return None

    def _raise_error(self) -> None:
        # Called with self._cv held.
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def flush(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait until every submitted state is written; raise a background error if any.

        Raises ``TimeoutError`` if the writes do not finish within ``timeout`` seconds.
        """
        with self._cv:
            done = self._cv.wait_for(
                lambda: self._pending is None and self._busy is None, timeout=timeout
            )
            if not done:
                step = self._busy if self._busy is not None else self._pending[0]
                raise TimeoutError(
                    f"checkpoint of stage {self.stage} step {step} not written "
                    f"after {timeout}s"
                )
            self._raise_error()

    def close(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Write what is pending, stop the thread; raise a background error if any.

        Idempotent. Raises ``TimeoutError`` if the thread does not stop within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            raise TimeoutError(
                f"checkpoint writer of stage {self.stage} did not stop after {timeout}s"
            )
        with self._cv:
            self._raise_error()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
