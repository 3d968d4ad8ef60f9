"""Pipeline schedules: plain functions that run one inner step of a replica's pipeline.

A schedule gets the driver (:class:`distqat.pipeline.driver.PipelineDriver`), the batch
already cut into micro-batches and each micro-batch's weight (its share of the batch's
units: samples, or predicted tokens), and returns the step's loss and timings. It only
decides *when* each micro-batch's forward and backward are issued; the hops, the wire
format (``hop.pack``: fp32, bf16, int8) and the optimizer step are the driver's and the
stages'. Both schedules take the gradient of the same weighted mean of micro-batch losses,
so uneven chunks still give the full batch's gradient and both end the step with the
same parameters (up to the order of floating-point sums).

* ``gpipe``: every micro-batch's forward in flight at once, then one backward of the
  weighted sum of their losses, in one distributed-autograd context; every stage steps
  with that context's gradients.
* ``1f1b``: at most ``num_stages`` micro-batches in flight (the warm-up); as soon as a
  micro-batch's loss is back its backward starts, and once that backward is done the next
  micro-batch's forward is issued, so in the steady state a stage alternates one forward
  and one backward, and activations of at most ``num_stages`` micro-batches are alive.

**One distributed-autograd context per micro-batch (1f1b), and why.** Distributed autograd
(torch 2.13, FAST mode) cannot run several backward passes in one context: on every node
it computes the dependencies of a backward pass from *all* the send functions the context
has recorded there, and waits for each of them to receive a gradient. Measured here
(a script with 2 workers and 3 micro-batches): a backward of micro-batch 0 issued
after the forwards of micro-batches 1 and 2 in the same context hangs until the RPC
timeout; a backward of micro-batch 1 after micro-batch 0's completed backward hangs the
same way (micro-batch 0's send function is still recorded and never gets a gradient
again); two concurrent backward calls in one context fail with the engine's internal
assertion ``initializedContextIds_.find(...) == end()``. So 1f1b gives each micro-batch
its own context. A context is the current one of the thread that made it, and torch
offers no way to switch a thread's context, so each micro-batch runs in a thread of the
driver's pool (:meth:`PipelineDriver.lanes`, kept across steps: a fresh thread per
micro-batch paid for a new OpenMP team each time where ``OMP_NUM_THREADS`` was unset):
forward, backward, then :meth:`StageHost.accumulate` on every stage, which adds the
context's gradients to the stage's sum for this step; then the context is released in
that same thread, which frees the thread for the next micro-batch. The folds run in
micro-batch order (each waits for the previous one), so every run adds
``((g0 + g1) + g2) ...`` in the same order; they overlap the pipeline's other work, and a
stage holds one gradient sum, not one gradient per micro-batch. The step then applies
that sum on every stage (``step([])``). gpipe keeps its one context: one backward over
all micro-batches is the case distributed autograd handles.

**Cost.** Per micro-batch 1f1b pays for a backward pass of its own, a fold and a context
release (an RPC to every other stage each): more CPU per inner step than gpipe, the more
so the more micro-batches (seen with a scratch script while writing this, not kept). gpipe's one backward, meanwhile, has the micro-batches' backward passes run
concurrently on torch's threads. gpipe measured as fast or faster in ``bench/pipeline.py``
(BENCHMARKS.md), hence the default; 1f1b is there for activations that do not fit
``num_microbatches`` times.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed.autograd as dist_autograd

from ..config import ModelPipelineConfig
from .stage import TRAIN

if TYPE_CHECKING:
    from .driver import PipelineDriver

MicroBatches = Sequence[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepTimes:
    """One inner step as a schedule ran it. ``forward_s``: until every micro-batch's loss
    was back; ``backward_s``: from then until every backward was done (and, under 1f1b,
    folded into the stages' sums; there most backward work overlaps the forwards and is
    counted in ``forward_s``); ``step_s``: the stages' optimizer steps."""

    loss: float
    forward_s: float
    backward_s: float
    step_s: float


def gpipe(driver: "PipelineDriver", micro: MicroBatches, weights: Sequence[float]) -> StepTimes:
    """All forwards, then one backward of the weighted sum of the losses (one context)."""
    with dist_autograd.context() as context_id:
        t0 = time.perf_counter()
        losses = torch.futures.wait_all([driver.send_forward(x, y, TRAIN) for x, y in micro])
        loss = sum(l * w for l, w in zip(losses, weights))
        t1 = time.perf_counter()
        dist_autograd.backward(context_id, [loss])
        t2 = time.perf_counter()
        driver.on_every_stage("step", [context_id])
        t3 = time.perf_counter()
    return StepTimes(loss.item(), t1 - t0, t2 - t1, t3 - t2)


class _MicroBatch:
    """One micro-batch of a 1f1b step, in a pool thread and its own autograd context.
    It reports ``sent`` once its forward has left stage 0 (the driver issues forwards in
    order), then posts itself to ``events`` when its backward is done and again when its
    gradients are folded into every stage's sum and its context released."""

    BACKWARD, FINISHED = "backward", "finished"

    def __init__(self, driver: "PipelineDriver", index: int, x: torch.Tensor, y: torch.Tensor,
                 weight: float, previous: Optional["_MicroBatch"], events: queue.Queue):
        self.driver, self.index, self.x, self.y, self.weight = driver, index, x, y, weight
        self.previous = previous  # folds run in micro-batch order: a deterministic sum
        self.events = events
        self.sent = threading.Event()
        self.folded = threading.Event()
        self.loss = 0.0
        self.loss_at = 0.0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            with dist_autograd.context() as context_id:
                future = self.driver.send_forward(self.x, self.y, TRAIN)
                self.sent.set()
                weighted = future.wait() * self.weight
                self.loss_at = time.perf_counter()
                dist_autograd.backward(context_id, [weighted])
                self.loss = weighted.item()
                self.events.put((self.BACKWARD, self))
                if self.previous is not None:
                    if not self.previous.folded.wait(3 * self.driver.rpc_timeout):
                        raise TimeoutError(f"1f1b: micro-batch {self.previous.index} never "
                                           "folded its gradients")
                    if self.previous.error is not None:
                        raise RuntimeError(f"1f1b: micro-batch {self.previous.index} failed"
                                           ) from self.previous.error
                self.driver.on_every_stage("accumulate", context_id)
        except BaseException as e:  # reported to the driver's thread, which raises it
            self.error = e
        finally:
            self.sent.set()
            self.folded.set()
            self.events.put((self.FINISHED, self))


def one_f_one_b(driver: "PipelineDriver", micro: MicroBatches,
                weights: Sequence[float]) -> StepTimes:
    """Warm-up with ``num_stages`` micro-batches in flight, then one new forward each time
    a backward is done; every stage steps with the sum it accumulated."""
    events: queue.Queue = queue.Queue()
    batches: List[_MicroBatch] = []
    for i, ((x, y), w) in enumerate(zip(micro, weights)):
        batches.append(_MicroBatch(driver, i, x, y, w, batches[-1] if batches else None, events))
    # between two events a micro-batch crossed at most a forward chain, a backward and a
    # fold, each bounded by the RPC timeout; this only guards against a lost thread
    patience = 3 * driver.rpc_timeout

    lanes = driver.lanes()

    def issue(mb: _MicroBatch) -> None:
        lanes.submit(mb.run)
        mb.sent.wait(patience)

    t0 = time.perf_counter()
    started = min(len(batches), driver.num_stages)
    for mb in batches[:started]:
        issue(mb)
    finished = 0
    while finished < len(batches):
        try:
            kind, mb = events.get(timeout=patience)
        except queue.Empty:
            raise TimeoutError(f"1f1b: no micro-batch progressed for {patience:.0f} s") from None
        if mb.error is not None:
            # the step is lost and the round ends with it; micro-batches still running
            # end on their own RPC timeouts
            raise mb.error
        if kind == _MicroBatch.FINISHED:
            finished += 1
        elif started < len(batches):
            issue(batches[started])
            started += 1
    t1 = max(mb.loss_at for mb in batches)
    t2 = time.perf_counter()  # every backward done and folded
    driver.on_every_stage("step", [])
    t3 = time.perf_counter()
    return StepTimes(sum(mb.loss for mb in batches), t1 - t0, t2 - t1, t3 - t2)


DEFAULT_SCHEDULE = ModelPipelineConfig.schedule
Schedule = Callable[["PipelineDriver", MicroBatches, Sequence[float]], StepTimes]
SCHEDULES: Dict[str, Schedule] = {"gpipe": gpipe, "1f1b": one_f_one_b}
