"""The driver side of a pipeline: one replica's chain of stages, fed micro-batches.

Per inner step the driver splits its batch into micro-batches and, for each, chains
``rref.remote().forward`` calls through the stages; the last hop is an ``rpc_async`` whose
future carries the logits back. All micro-batches are in flight at once, so stage k works
on micro-batch m while stage k+1 works on m-1. The loss is the cross entropy of the whole
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


@dataclass
class StepStats:
    loss: float
    samples: int
    forward_s: float
    backward_s: float
    step_s: float


class PipelineDriver:
    def __init__(self, stages: Sequence[rpc.RRef], *, num_microbatches: int,
                 rpc_timeout: float, dtype: torch.dtype = torch.float32):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self.num_microbatches = num_microbatches
        self.rpc_timeout = rpc_timeout
        self.dtype = dtype

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        futures = []
        for micro in x.chunk(self.num_microbatches):
            hop = rpc.RRef(micro)
            for stage in self.stages[:-1]:
                hop = stage.remote(timeout=self.rpc_timeout).forward(hop)
            futures.append(self.stages[-1].rpc_async(timeout=self.rpc_timeout).forward(hop))
        return torch.cat(torch.futures.wait_all(futures))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x = x.to(self.dtype)
        with dist_autograd.context() as context_id:
            t0 = time.perf_counter()
            logits = self._forward(x)
            loss = F.cross_entropy(logits, y)
            t1 = time.perf_counter()
            dist_autograd.backward(context_id, [loss])
            t2 = time.perf_counter()
            torch.futures.wait_all([s.rpc_async(timeout=self.rpc_timeout).step(context_id)
                                    for s in self.stages])
            t3 = time.perf_counter()
        return StepStats(loss.item(), len(x), t1 - t0, t2 - t1, t3 - t2)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
        """Loss and accuracy of the current (local) stages on ``(x, y)``; no autograd."""
        logits = self._forward(x.to(self.dtype))
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

    def outer_step(self, timeout: float) -> List[dict]:
        """Every stage's DiLoCo outer step (they run concurrently, one per stage host)."""
        return torch.futures.wait_all([s.rpc_async(timeout=timeout).outer_step()
                                       for s in self.stages])

    def state_dicts(self) -> List[dict]:
        return [s.rpc_sync(timeout=self.rpc_timeout).state_dict() for s in self.stages]

    def summaries(self) -> List[dict]:
        return [s.rpc_sync(timeout=self.rpc_timeout).summary() for s in self.stages]
