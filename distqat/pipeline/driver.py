"""The driver side of a pipeline: one replica's chain of stages, fed micro-batches.

Per inner step the driver cuts its batch into ``num_microbatches`` micro-batches (sizes
differ by at most one sample) and hands them to its schedule
(:mod:`distqat.pipeline.schedule`, ``model_pipeline.schedule``: ``gpipe`` or ``1f1b``),
which decides when each forward and backward is issued. A forward runs stage 0 here and
sends the activation (and the micro-batch's targets) to stage 1 with ``rpc_async``; each
stage forwards its output to the next, and the last stage answers with the micro-batch's
mean loss, which comes back along the chain, so stage k works on micro-batch m while
stage k+1 works on m-1. Each micro-batch's loss is weighted by its units (samples, or
predicted tokens), so uneven chunks still give the full batch's gradient;
``dist_autograd.backward`` carries it back through every stage, and each stage then takes
its inner step with the gradients of the step's autograd context(s). One RPC per stage
hop per micro-batch, plus one step call per stage (and, under 1f1b, one gradient fold per
stage per micro-batch).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed.rpc as rpc

from ..data.task import Objective
from . import hop
from .schedule import DEFAULT_SCHEDULE, SCHEDULES
from .stage import CALIBRATE, EVAL, TRAIN, StageHost

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    loss: float
    samples: int
    forward_s: float
    backward_s: float
    step_s: float


def evaluate_in_chunks(objective: Objective, sums_of: Callable[[torch.Tensor, torch.Tensor], Dict],
                       x: torch.Tensor, y: torch.Tensor, chunk: int) -> Dict[str, float]:
    """The task's eval metrics over ``(x, y)``, computed ``chunk`` samples at a time (an
    eval set of a language model's logits would not fit at once): sums add up chunk by
    chunk, so the metrics equal the all-at-once ones."""
    total: Dict[str, float] = {}
    units = 0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        for key, value in sums_of(xs, ys).items():
            total[key] = total.get(key, 0.0) + value
        units += objective.units(ys)
    return objective.eval_metrics(total, units)


def _done(value) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


def split(x: torch.Tensor, y: torch.Tensor, parts: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` cut into ``parts`` micro-batches whose sizes differ by at most one
    (fewer when the batch has fewer samples). ``Tensor.chunk`` would cut 10 samples into
    3 + 3 + 3 + 1 when asked for 4, and into five micro-batches when asked for 6."""
    parts = max(1, min(parts, len(x)))
    return list(zip(x.tensor_split(parts), y.tensor_split(parts)))


class PipelineDriver:
    """One replica's driver. It hosts stage 0 (``first``, called in the thread that issues
    a forward, so that thread's distributed-autograd context is there from the first layer
    on) and reaches stages 1.. through ``rest``, RRefs owned by their hosts. ``schedule``
    names the inner step's schedule (:data:`distqat.pipeline.schedule.SCHEDULES`)."""

    def __init__(self, first: StageHost, rest: Sequence[rpc.RRef], *, objective: Objective,
                 num_microbatches: int, rpc_timeout: float, dtype: torch.dtype = torch.float32,
                 eval_chunk: int = 256, schedule: str = DEFAULT_SCHEDULE):
        if schedule not in SCHEDULES:
            raise ValueError(f"model_pipeline.schedule: expected one of {list(SCHEDULES)}, "
                             f"got {schedule!r}")
        self.first = first
        self.rest = list(rest)
        self.objective = objective
        self.num_microbatches = num_microbatches
        self.rpc_timeout = rpc_timeout
        self.dtype = dtype
        self.eval_chunk = eval_chunk
        self.schedule = schedule
        self._lanes: Optional[ThreadPoolExecutor] = None
        log.info("driving %d stages: %d micro-batches per inner step, schedule %s",
                 self.num_stages, num_microbatches, schedule)

    @property
    def num_stages(self) -> int:
        return 1 + len(self.rest)

    def lanes(self) -> ThreadPoolExecutor:
        """Threads for schedules that run each micro-batch in a thread of its own (1f1b:
        one autograd context per micro-batch, and contexts are per thread), kept across
        steps; at most one per micro-batch is ever busy."""
        if self._lanes is None:
            self._lanes = ThreadPoolExecutor(max_workers=max(1, self.num_microbatches),
                                             thread_name_prefix="microbatch")
        return self._lanes

    def send_forward(self, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.futures.Future:
        """One micro-batch into the chain: stage 0 here (in the calling thread), the rest by
        RPC; the future holds the last stage's answer (the loss, in training). Returns once
        stage 0 is done, so the caller can run stage 0 of the next micro-batch while stage
        1 works on this one."""
        out = self.first.run(x, mode)
        if not self.rest:
            return _done(self.first.finish(out, y, mode))
        counter = self.first.wire_counter if mode == TRAIN else hop.WireCounter()
        packed = hop.pack(out.cpu(), self.first.wire_format, counter)
        return self.rest[0].rpc_async(timeout=self.rpc_timeout).forward(packed, mode, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor, mode: str, chunks: int) -> List:
        """Every micro-batch through the chain at once; the last stage's answers, in order."""
        return torch.futures.wait_all([self.send_forward(xm, ym, mode)
                                       for xm, ym in split(x, y, chunks)])

    def on_every_stage(self, method: str, *args, timeout: Optional[float] = None) -> List:
        """``method(*args)`` on every stage of the replica, remote ones first so that
        they run while stage 0 runs here (``timeout``: the RPC timeout by default)."""
        timeout = self.rpc_timeout if timeout is None else timeout
        futures = [getattr(r.rpc_async(timeout=timeout), method)(*args) for r in self.rest]
        local = getattr(self.first, method)(*args)
        return [local] + torch.futures.wait_all(futures)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x = self.objective.prepare_input(x, self.dtype)
        micro = split(x, y, self.num_microbatches)
        units = [self.objective.units(ym) for _, ym in micro]
        weights = [u / sum(units) for u in units]
        times = SCHEDULES[self.schedule](self, micro, weights)
        return StepStats(times.loss, len(x), times.forward_s, times.backward_s, times.step_s)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """The task's eval metrics of the current (local) stages on ``(x, y)``."""
        def sums_of(xs, ys):
            parts = self._forward(self.objective.prepare_input(xs, self.dtype), ys, EVAL,
                                  self.num_microbatches)
            return {k: sum(p[k] for p in parts) for k in parts[0]}

        return evaluate_in_chunks(self.objective, sums_of, x, y, self.eval_chunk)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set every quantizer's range from one batch before training (the whole batch in
        one piece, as the single-process model sees it), then restart DiLoCo's global copy
        of every stage from the calibrated state."""
        self._forward(self.objective.prepare_input(x, self.dtype), y, CALIBRATE, 1)
        self.on_every_stage("calibrated")

    def outer_step(self, timeout: float, samples: Optional[Sequence[int]] = None,
                   positions: Optional[Dict[int, int]] = None) -> List[dict]:
        """Every stage's DiLoCo outer step (they run concurrently, one per stage host),
        averaging weighted by ``samples`` (each replica's samples in this window, by
        replica); ``positions`` (every replica's data position after it) go into the
        stages' checkpoints."""
        return self.on_every_stage("outer_step", samples, positions, timeout=timeout)

    def state_dicts(self) -> List[dict]:
        return self.on_every_stage("state_dict")

    def summaries(self) -> List[dict]:
        return self.on_every_stage("summary")

    def wire_bytes(self) -> Tuple[int, int]:
        """Bytes this replica sent across stage boundaries so far: (activations, grads)."""
        stages = self.summaries()
        return (sum(s["activation_bytes"] for s in stages),
                sum(s["gradient_bytes"] for s in stages))
