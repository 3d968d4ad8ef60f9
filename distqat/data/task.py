"""The task contract: what a batch is, how the loss is formed, which metrics eval reports.

A :class:`Task` owns its data: ``batch(shard, offset, batch_size)`` is samples
``[offset, offset + batch_size)`` of shard ``shard``'s stream (see :mod:`.shards`), a pure
function, so a replica's data position is one integer that survives restarts. Its
:class:`Objective` owns the arithmetic on the last stage's output: the training loss (a
mean over *units*: samples for classification, predicted tokens for a language model),
eval sums (so eval can run in chunks and still give the all-at-once numbers) and the
metrics made from them. An objective needs no data, so the driver and the last stage host
build it from the config alone with :func:`make_objective`.

Tasks are named by ``data.name``; their settings are ``data.args`` (as a model's are
``model_pipeline.model_args``), checked by :func:`check_task` before anything loads.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Type

import torch
import torch.nn.functional as F

Batch = Tuple[torch.Tensor, torch.Tensor]


class Objective:
    """Loss and metrics of a task; subclasses say what a unit is."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss: a mean over units."""
        raise NotImplementedError

    def units(self, target: torch.Tensor) -> int:
        raise NotImplementedError

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """Sums over the units of one chunk; add chunks' sums key by key."""
        raise NotImplementedError

    def eval_metrics(self, sums: Mapping[str, float], units: int) -> Dict[str, float]:
        raise NotImplementedError

    def prepare_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Float inputs in the run's dtype; token ids stay integers."""
        return x.to(dtype) if x.is_floating_point() else x


class Classification(Objective):
    """Cross entropy over class logits ``(B, C)`` against labels ``(B,)``; accuracy."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def units(self, target: torch.Tensor) -> int:
        return int(target.shape[0])

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        with torch.no_grad():
            return {"loss": float(F.cross_entropy(output, target, reduction="sum")),
                    "correct": float((output.argmax(dim=-1) == target).sum())}

    def eval_metrics(self, sums: Mapping[str, float], units: int) -> Dict[str, float]:
        return {"loss": sums["loss"] / units, "accuracy": sums["correct"] / units}


class CausalLM(Objective):
    """Next-token cross entropy: logits ``(B, T, V)`` at position t predict token t + 1 of
    the ids ``(B, T)`` (the target is the input itself), so a block of T tokens has T - 1
    units. Perplexity is exp of the mean loss."""

    @staticmethod
    def _shifted(output: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if output.dim() != 3 or target.dim() != 2 or output.shape[:2] != target.shape:
            raise ValueError(f"causal LM: expected logits (B, T, V) and ids (B, T), got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}")
        logits = output[:, :-1].reshape(-1, output.shape[-1])
        return logits, target[:, 1:].reshape(-1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(*self._shifted(output, target))

    def units(self, target: torch.Tensor) -> int:
        return int(target.shape[0] * (target.shape[1] - 1))

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        with torch.no_grad():
            logits, labels = self._shifted(output, target)
            return {"loss": float(F.cross_entropy(logits, labels, reduction="sum")),
                    "correct": float((logits.argmax(dim=-1) == labels).sum())}

    def eval_metrics(self, sums: Mapping[str, float], units: int) -> Dict[str, float]:
        loss = sums["loss"] / units
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class Task(Protocol):
    objective: Objective

    def model_io(self) -> dict: ...
    def batch(self, shard: int, offset: int, batch_size: int) -> Batch: ...
    def eval_set(self) -> Batch: ...
    def calibration_batch(self, batch_size: int) -> Batch: ...


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: where its class lives (imported only when data is wanted),
    its objective, and its settings dataclass (None: it takes no ``data.args``)."""

    target: str
    objective: Callable[[], Objective]
    args: Optional[Callable[[], Type[Any]]] = None

    def load(self) -> Callable[[Any], Task]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module, __package__), name)


def _args_class(module: str, name: str) -> Callable[[], Type[Any]]:
    return lambda: getattr(importlib.import_module(module, __package__), name)


TASKS: Dict[str, TaskSpec] = {
    "teacher": TaskSpec(".teacher:TeacherTask", Classification),
    "digits": TaskSpec(".digits:DigitsTask", Classification),
    "image": TaskSpec(".image:ImageTask", Classification, _args_class(".image", "ImageArgs")),
    "text": TaskSpec(".text:TextTask", CausalLM, _args_class(".text", "TextArgs")),
    "audio": TaskSpec(".audio:AudioTask", Classification, _args_class(".audio", "AudioArgs")),
}


def _spec(cfg: Any) -> TaskSpec:
    if cfg.name not in TASKS:
        raise ValueError(f"data.name: unknown task {cfg.name!r}; known: {sorted(TASKS)}")
    return TASKS[cfg.name]


def task_args(cfg: Any) -> Any:
    """``data.args`` as the task's settings dataclass (checked), or None for a task that
    takes none. Raises ValueError naming ``data.args.<key>``."""
    spec = _spec(cfg)
    given = dict(getattr(cfg, "args", None) or {})
    if spec.args is None:
        if given:
            key = sorted(given)[0]
            raise ValueError(f"data.args.{key}: task {cfg.name!r} takes no settings")
        return None
    cls = spec.args()
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(given):
        if key not in known:
            raise ValueError(f"data.args.{key}: unknown setting of task {cfg.name!r}; "
                             f"known: {sorted(known)}")
    return cls(**given)


def check_task(cfg: Any) -> None:
    """The task name and its settings, without loading any data."""
    task_args(cfg)


def make_objective(cfg: Any) -> Objective:
    """The objective of ``cfg``'s task: no data is read."""
    return _spec(cfg).objective()


def make_task(cfg: Any) -> Task:
    check_task(cfg)
    return _spec(cfg).load()(cfg)


def check_data(cfg: Any) -> None:
    """The cheap checks before workers start (the CLIs exit 2 on a ValueError): the task
    and its settings, the path exists with readable headers and the expected columns, or
    the hub dataset is cached or reachable; a tokenizer folder exists. Nothing is decoded."""
    from pathlib import Path

    from .source import DataError, SourceArgs, check_columns, check_source
    args = task_args(cfg)
    if cfg.name == "digits" and cfg.path and not Path(cfg.path).is_file():
        raise DataError(f"data.path: {cfg.path} does not exist (a digits CSV)")
    if not isinstance(args, SourceArgs):
        return
    check_source(cfg, args)
    check_columns(cfg, args, args.columns())
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer and tokenizer != "byte" and (tokenizer.startswith((".", "/", "~"))
                                              and not Path(tokenizer).expanduser().is_dir()):
        raise DataError(f"data.args.tokenizer: folder {tokenizer} does not exist")
