"""Training data: tasks give batches as a pure function of (seed, shard, offset).

``teacher`` (default) is synthetic but learnable; ``digits`` is a real small dataset
shipped with the package; both need no download. ``image``, ``text`` and ``audio`` read
HF datasets (a hub name or a local copy at ``data.path``); see :mod:`.task` for the
contract (batches, loss, metrics) and :mod:`.source` for where data comes from."""

from __future__ import annotations

from .digits import DigitsTask
from .source import DataError
from .task import (TASKS, Batch, CausalLM, Classification, Objective, Task, check_data,
                   check_task, make_objective, make_task, task_args)
from .teacher import TeacherTask

__all__ = ["Task", "TeacherTask", "DigitsTask", "make_task", "make_objective",
           "check_task", "check_data", "task_args", "DataError", "Objective",
           "Classification", "CausalLM", "Batch", "TASKS"]
