"""Writing a stage's checkpoints in the background, so an outer step waits only for the
copy to CPU, not for serialization and disk."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .format import CheckpointError, PathLike, encode
from . import store

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0


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
                store._save_encoded(folder, self.stage, step, data, self.keep)
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
