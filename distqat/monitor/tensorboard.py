"""TensorBoard event files of a run: ``replica<r>/``, ``stage<s>-replica<r>/``, ``fleet/``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter


class Scalars:
    """A lazily opened TensorBoard writer for one subfolder of the run (a worker that
    never logs leaves no empty event file behind)."""

    def __init__(self, run_path: Path, name: str):
        self.path = run_path / name
        self._writer: Optional[SummaryWriter] = None

    def add(self, step: int, **values: float) -> None:
        if self._writer is None:
            self._writer = SummaryWriter(str(self.path))
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
