"""Loading that overlaps training: a thread computes the next batches of one shard.

``Prefetcher(task, shard, offset, batch_size)`` yields ``task.batch(shard, offset +
k * batch_size, batch_size)`` for k = 0, 1, ... in order, exactly what direct calls give
(batches are pure), while a background thread keeps up to ``depth`` of them ready: decoding
and augmentation run while the model computes (torch and PIL release the GIL for the heavy
parts). ``position`` is the number of samples handed out, so the replica's data position to
save in a checkpoint is ``position`` and a restore starts a new prefetcher there. A thread is
enough on few cores; a loading error is raised by the ``next()`` that would have returned it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional, Tuple

from .task import Batch

_STOP = object()


class Prefetcher:
    def __init__(self, task: Any, shard: int, offset: int, batch_size: int, depth: int = 2):
        if batch_size < 1 or depth < 1 or offset < 0:
            raise ValueError(f"batch_size and depth must be >= 1 and offset >= 0, got "
                             f"{batch_size}, {depth}, {offset}")
        self.task, self.shard, self.batch_size = task, shard, batch_size
        self.position = offset
        self._queue: "queue.Queue[Tuple[int, Any]]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(offset,), daemon=True,
                                        name=f"prefetch-shard{shard}")
        self._thread.start()

    def _put(self, item: Tuple[int, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, offset: int) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self.task.batch(self.shard, offset, self.batch_size)
            except BaseException as e:  # handed to the consumer, which raises it
                self._put((offset, e))
                return
            if not self._put((offset, item)):
                return
            offset += self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise RuntimeError("the prefetcher is closed")
        offset, item = self._queue.get()
        assert offset == self.position, (offset, self.position)
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.position += self.batch_size
        return item

    def close(self, timeout: Optional[float] = 5.0) -> None:
        """Stop the thread (it finishes the batch it is computing)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
