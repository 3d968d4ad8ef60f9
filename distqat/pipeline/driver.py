"""The driver side of a pipeline: one replica's chain of stages, fed micro-batches.

Per inner step the driver splits its batch into micro-batches; for each it runs stage 0
itself and sends the activation (and the micro-batch's targets) to stage 1 with
``rpc_async``; each stage forwards its output to the next, and the last stage answers with
the micro-batch's mean loss, which comes back along the chain. All micro-batches are in
flight at once, so stage k works on micro-batch m while stage k+1 works on m-1. The
batch's loss is the mean of the micro-batch losses weighted by their units (samples, or
predicted tokens), so uneven chunks still give the full batch's gradient;
``dist_autograd.backward`` carries it back through every stage, and each stage then takes
its inner step with that context's gradients. One RPC per stage hop per micro-batch, plus
one step call per stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from ..data.task import Objective
from . import hop
from .stage import CALIBRATE, EVAL, TRAIN, StageHost


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


class PipelineDriver:
    """One replica's driver. It hosts stage 0 (``first``, called in this thread, so the
    distributed-autograd context is there from the first layer on) and reaches stages
    1.. through ``rest``, RRefs owned by their hosts."""

    def __init__(self, first: StageHost, rest: Sequence[rpc.RRef], *, objective: Objective,
                 num_microbatches: int, rpc_timeout: float, dtype: torch.dtype = torch.float32,
                 eval_chunk: int = 256):
        self.first = first
        self.rest = list(rest)
        self.objective = objective
        self.num_microbatches = num_microbatches
        self.rpc_timeout = rpc_timeout
        self.dtype = dtype
        self.eval_chunk = eval_chunk

    def _forward(self, x: torch.Tensor, y: torch.Tensor, mode: str, chunks: int) -> List:
        """Every micro-batch through the chain; the last stage's answers, in order."""
        futures = []
        for xm, ym in zip(x.chunk(chunks), y.chunk(chunks)):
            out = self.first.run(xm, mode)
            if not self.rest:
                futures.append(_done(self.first.finish(out, ym, mode)))
                continue
            counter = self.first.wire_counter if mode == TRAIN else hop.WireCounter()
            packed = hop.pack(out.cpu(), self.first.wire_format, counter)
            # stage 0 of the next micro-batch runs here while stage 1 works on this one
            futures.append(self.rest[0].rpc_async(timeout=self.rpc_timeout)
                           .forward(packed, mode, ym))
        return torch.futures.wait_all(futures)

    def _on_every_stage(self, method: str, *args, timeout: float) -> List:
        """``method(*args)`` on every stage of the replica, remote ones first so that
        they run while stage 0 runs here."""
        futures = [getattr(r.rpc_async(timeout=timeout), method)(*args) for r in self.rest]
        local = getattr(self.first, method)(*args)
        return [local] + torch.futures.wait_all(futures)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x = self.objective.prepare_input(x, self.dtype)
        units = [self.objective.units(ym) for ym in y.chunk(self.num_microbatches)]
        weights = [u / sum(units) for u in units]
        with dist_autograd.context() as context_id:
            t0 = time.perf_counter()
            losses = self._forward(x, y, TRAIN, self.num_microbatches)
            loss = sum(l * w for l, w in zip(losses, weights))
            t1 = time.perf_counter()
            dist_autograd.backward(context_id, [loss])
            t2 = time.perf_counter()
            self._on_every_stage("step", context_id, timeout=self.rpc_timeout)
            t3 = time.perf_counter()
        return StepStats(loss.item(), len(x), t1 - t0, t2 - t1, t3 - t2)

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
        self._on_every_stage("calibrated", timeout=self.rpc_timeout)

    def outer_step(self, timeout: float) -> List[dict]:
        """Every stage's DiLoCo outer step (they run concurrently, one per stage host)."""
        return self._on_every_stage("outer_step", timeout=timeout)

    def state_dicts(self) -> List[dict]:
        return self._on_every_stage("state_dict", timeout=self.rpc_timeout)

    def summaries(self) -> List[dict]:
        return self._on_every_stage("summary", timeout=self.rpc_timeout)

    def wire_bytes(self) -> Tuple[int, int]:
        """Bytes this replica sent across stage boundaries so far: (activations, grads)."""
        stages = self.summaries()
        return (sum(s["activation_bytes"] for s in stages),
                sum(s["gradient_bytes"] for s in stages))
