"""Training data: a task gives batches as a pure function of (seed, shard, step).

``teacher`` (default) is synthetic but learnable; ``digits`` is a real small dataset
shipped with the package. Both need no download."""

from __future__ import annotations

from typing import Protocol, Tuple

import torch

from ..config import DataConfig
from .digits import DigitsTask
from .teacher import TeacherTask


class Task(Protocol):
    def batch(self, shard: int, step: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]: ...
    def eval_set(self) -> Tuple[torch.Tensor, torch.Tensor]: ...
    def calibration_batch(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]: ...
    def model_io(self) -> dict: ...


TASKS = {"teacher": TeacherTask, "digits": DigitsTask}


def make_task(cfg: DataConfig) -> Task:
    if cfg.name not in TASKS:
        raise ValueError(f"data.name: unknown task {cfg.name!r}; known: {sorted(TASKS)}")
    return TASKS[cfg.name](cfg)


__all__ = ["Task", "TeacherTask", "DigitsTask", "make_task"]
