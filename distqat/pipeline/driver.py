"""The driver side of a pipeline: one replica's chain of stages, fed micro-batches.

Per inner step the driver splits its batch into micro-batches; for each it runs stage 0
itself and sends the activation to stage 1 with ``rpc_async``; each stage forwards its
output to the next, and the last stage's logits come back along the chain. All
micro-batches are in flight at once, so stage k works on micro-batch m while stage k+1
works on m-1. The loss is the cross entropy of the whole
batch (so the gradient equals the full model's), ``dist_autograd.backward`` carries it
back through every stage, and each stage then takes its inner step with that context's
gradients. One RPC per stage hop per micro-batch, plus one step call per stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F

from . import hop
from .stage import StageHost


@dataclass
class StepStats:
    loss: float
    samples: int
    forward_s: float
    backward_s: float
    step_s: float


def _done(value) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


class PipelineDriver:
    """One replica's driver. It hosts stage 0 (``first``, called in this thread, so the
    distributed-autograd context is there from the first layer on) and reaches stages
    1.. through ``rest``, RRefs owned by their hosts."""

    def __init__(self, first: StageHost, rest: Sequence[rpc.RRef], *, num_microbatches: int,
                 rpc_timeout: float, dtype: torch.dtype = torch.float32):
        self.first = first
        self.wire_counter = hop.WireCounter()  # the logits' hop back to this driver
        self.rest = list(rest)
        self.num_microbatches = num_microbatches
        self.rpc_timeout = rpc_timeout
        self.dtype = dtype

    def _forward(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        futures = []
        for micro in x.chunk(self.num_microbatches):
            y = self.first.compute(micro, training)
            if not self.rest:
                futures.append(_done(y))
                continue
            counter = self.first.wire_counter if training else hop.WireCounter()
            packed = hop.pack(y, self.first.wire_format, counter)
            # stage 0 of the next micro-batch runs here while stage 1 works on this one
            futures.append(self.rest[0].rpc_async(timeout=self.rpc_timeout)
                           .forward(packed, training))
        outputs = torch.futures.wait_all(futures)
        if self.rest:
            counter = self.wire_counter if training else hop.WireCounter()
            outputs = [hop.unpack(p, counter, self.rpc_timeout) for p in outputs]
        return torch.cat(outputs)

    def _on_every_stage(self, method: str, *args, timeout: float) -> List:
        """``method(*args)`` on every stage of the replica, remote ones first so that
        they run while stage 0 runs here."""
        futures = [getattr(r.rpc_async(timeout=timeout), method)(*args) for r in self.rest]
        local = getattr(self.first, method)(*args)
        return [local] + torch.futures.wait_all(futures)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x = x.to(self.dtype)
        with dist_autograd.context() as context_id:
            t0 = time.perf_counter()
            logits = self._forward(x)
            loss = F.cross_entropy(logits, y)
            t1 = time.perf_counter()
            dist_autograd.backward(context_id, [loss])
            t2 = time.perf_counter()
            self._on_every_stage("step", context_id, timeout=self.rpc_timeout)
            t3 = time.perf_counter()
        return StepStats(loss.item(), len(x), t1 - t0, t2 - t1, t3 - t2)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
        """Loss and accuracy of the current (local) stages on ``(x, y)``."""
        logits = self._forward(x.to(self.dtype), training=False)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

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
        return (sum(s["activation_bytes"] for s in stages) + self.wire_counter.activation_bytes,
                sum(s["gradient_bytes"] for s in stages) + self.wire_counter.gradient_bytes)
