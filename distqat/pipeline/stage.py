"""The host side of a pipeline stage: one stage of one replica, owned by one worker.

The driver hosts stage 0 itself and calls it directly; every later stage is reached
through an RRef owned by the worker that hosts it (:func:`stage_rref`), and each stage
holds the RRef of the next one, so activations travel stage to stage. Calls arrive on RPC
threads: ``forward`` per micro-batch, ``step`` once per inner step with the step's
distributed-autograd context(s) (under 1f1b each micro-batch's is folded in by
``accumulate`` as its backward ends), ``outer_step`` every ``inner_steps``. The last
stage turns its output into the micro-batch's loss (or eval sums) with the task's
objective. Activations cross the wire on the CPU (distributed autograd does not work with
CUDA device maps): the input is moved to the stage's device on arrival and the output
back to the CPU before it is sent on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch import nn

from .. import faults
from ..checkpoint import CheckpointWriter
from ..data.task import Objective
from ..diloco import DiLoCo, OuterStepStats
from ..monitor.tensorboard import Scalars
from ..optim import Optimizer
from . import hop

log = logging.getLogger(__name__)

# The stage this process hosts, looked up by the driver's rpc.remote(). A process-local
# table is unavoidable: RPC calls name module-level functions, not objects.
_HOSTED: Dict[int, "StageHost"] = {}

TRAIN, EVAL, CALIBRATE = "train", "eval", "calibrate"  # what a forward is for
COUNTERS = ("allreduce_bytes", "activation_bytes", "gradient_bytes")  # job-cumulative


def autocast(device: torch.device, precision: str):
    """The forward's autocast region: bfloat16 under ``precision: bf16``, off under
    ``fp32``. Parameters stay float32 either way; only the matmuls and convolutions
    (and what they pass on) run in bfloat16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(out: torch.Tensor) -> torch.Tensor:
    """A low-precision output in float32 for the loss and the eval metrics."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


class StageHost:
    """One stage of one replica. It owns the stage's module and inner optimizer, its
    DiLoCo state (global copy, outer optimizer) and the RRef of the next stage; it writes
    its own checkpoint (``checkpoints``, every outer step) and TensorBoard scalars
    (``scalars``). Micro-batches of its replica arrive concurrently on RPC threads and run
    one at a time (``_lock``)."""

    def __init__(self, stage: int, replica: int, module: nn.Module, *,
                 optimizer: Optimizer, diloco: DiLoCo, device: torch.device,
                 objective: Optional[Objective] = None, rpc_timeout: float = 60.0,
                 wire_format: str = "fp32", inner_steps: int = 1,
                 checkpoints: Optional[CheckpointWriter] = None,
                 scalars: Optional[Scalars] = None, precision: str = "fp32"):
        self.stage = stage
        self.precision = precision
        self.replica = replica
        self.module = module
        self.device = device
        self.optimizer = optimizer
        self.objective = objective  # the last stage's: the loss and eval sums
        self.wire_format = wire_format
        self.wire_counter = hop.WireCounter()
        self.diloco = diloco
        self.inner_steps = inner_steps  # per outer step
        self.checkpoints = checkpoints
        self.scalars = scalars
        self.rpc_timeout = rpc_timeout
        self.next_stage: Optional[rpc.RRef] = None
        # micro-batches of one replica arrive concurrently; the module runs one at a time
        self._lock = threading.Lock()
        # this inner step's gradients, summed over its autograd contexts (accumulate, step)
        self._grad_sum: Dict[torch.Tensor, torch.Tensor] = {}
        self._grads_lock = threading.Lock()
        self.inner_steps_done = 0
        self.last_contact = time.monotonic()
        self.outer_stats: list[OuterStepStats] = []
        # the job's byte counters when this round started (from the restored checkpoint)
        self.counters_base = {key: 0 for key in COUNTERS}
        # every replica's data position (samples read) after the last outer step
        self.data_positions: Dict[int, int] = {}
        # the replica of each rank of the stage's group, in group-rank order
        self.group_replicas: List[int] = [replica]

    def connect_next(self, next_stage: Optional[rpc.RRef]) -> None:
        """Set the RRef of the next stage of this replica (None for the last stage)."""
        self.next_stage = next_stage

    def run(self, x: torch.Tensor, mode: str = TRAIN) -> torch.Tensor:
        """This stage on one micro-batch, on the stage's device. ``eval`` runs the module
        in eval mode without autograd (quantizers do not observe); ``calibrate`` runs it in
        training mode without autograd (quantizers observe, nothing learns)."""
        self.last_contact = time.monotonic()
        with self._lock, autocast(self.device, self.precision):
            x = x.to(self.device)
            if mode == TRAIN:
                return self.module(x)
            if mode == CALIBRATE:
                with torch.no_grad():
                    return self.module(x)
            self.module.eval()
            try:
                with torch.no_grad():
                    return self.module(x)
            finally:
                self.module.train()

    def finish(self, out: torch.Tensor, target: Optional[torch.Tensor], mode: str):
        """The last stage's answer for one micro-batch: its mean loss (train: a tensor that
        carries the backward), its eval sums (eval), or nothing (calibrate). Computing the
        loss here means only a scalar travels back, not the logits (for a language model
        those are batch x tokens x vocabulary)."""
        out = full_precision(out)
        if mode == TRAIN:
            return self.objective.loss(out, target.to(out.device)).cpu()
        if mode == EVAL:
            return self.objective.eval_sums(out, target.to(out.device))
        return None

    @rpc.functions.async_execution
    def forward(self, packed: hop.Packed, mode: str = TRAIN,
                target: Optional[torch.Tensor] = None) -> torch.futures.Future:
        """This stage and, through the next stage's RRef, the rest of the chain: the
        activation goes straight to the next stage, ``target`` rides along to the last
        one, whose answer (:meth:`finish`) comes back along the chain. In training each
        hop carries a tensor that requires grad, which is what makes RPC carry the
        distributed-autograd context (and record the hop) to the next stage."""
        # evaluation and calibration traffic is not training traffic: count only the latter
        counter = self.wire_counter if mode == TRAIN else hop.WireCounter()
        x = hop.unpack(packed, counter, self.rpc_timeout)
        out = self.run(x, mode)
        if self.next_stage is None:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(self.finish(out, target, mode))
            return done
        packed_out = hop.pack(out.cpu(), self.wire_format, counter)
        return self.next_stage.rpc_async(timeout=self.rpc_timeout).forward(packed_out, mode, target)

    def calibrated(self) -> None:
        """After the calibration forward: every replica of the stage takes the group's
        first rank's parameters and quantizer state again, and DiLoCo's global copy starts
        from them (the replicas computed the same values; the broadcast makes it certain)."""
        self.last_contact = time.monotonic()
        with self._lock:
            self.diloco.broadcast_initial()

    def accumulate(self, context_id: int) -> None:
        """Add the gradients of autograd context ``context_id`` to this inner step's sum.
        1f1b runs each micro-batch in its own context (distributed autograd cannot run
        several backward passes in one; see :mod:`distqat.pipeline.schedule`) and folds
        each here once its backward is done, so the context can be released and the stage
        holds one sum, not one gradient per micro-batch. The first context's tensors are
        taken as they are (no copy); later ones are added into them."""
        self.last_contact = time.monotonic()
        grads = dist_autograd.get_gradients(context_id)
        with self._grads_lock:
            for p, g in grads.items():
                have = self._grad_sum.get(p)
                self._grad_sum[p] = g if have is None else have.add_(g)

    def step(self, context_ids: Sequence[int] = ()) -> int:
        """The inner optimizer step with the gradients of autograd contexts ``context_ids``
        (gpipe: its one context) on top of those :meth:`accumulate` folded in (1f1b)."""
        self.last_contact = time.monotonic()
        for context_id in context_ids:
            self.accumulate(context_id)
        with self._grads_lock:
            grads, self._grad_sum = self._grad_sum, {}
        with self._lock:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = grads.get(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.inner_steps_done += 1
            self.diloco.inner_step_done()  # streaming DiLoCo posts/applies fragments here
        return self.inner_steps_done

    def outer_step(self, samples: Optional[Sequence[int]] = None,
                   positions: Optional[Dict[int, int]] = None) -> dict:
        """DiLoCo's outer step; blocks until every replica of this stage has joined it.
        ``samples``: each replica's samples in this window, by replica (the average's
        weights; None: equal); ``positions``: the replicas' data positions after it."""
        self.last_contact = time.monotonic()
        faults.point("allreduce")  # test-only: a host dying here (distqat/faults.py)
        if positions is not None:
            self.data_positions = dict(positions)
        with self._lock:
            self.diloco.set_weights(None if samples is None else
                                    [samples[r] for r in self.group_replicas])
            stats = self.diloco.outer_step()
        self.outer_stats.append(stats)
        self.last_contact = time.monotonic()
        totals = self.counters()
        if self.scalars is not None:
            step = stats.outer_step * self.inner_steps  # the job's inner step, as every chart
            self.scalars.add("outer", step, step_s=stats.seconds,
                             pseudo_grad_norm=stats.pseudo_grad_norm)
            self.scalars.add("wire", step, **totals)
        if self.checkpoints is not None:
            self.checkpoints.submit(stats.outer_step, {
                "stage": self.stage, "inner_steps_done": stats.outer_step * self.inner_steps,
                "counters": totals, "data_positions": self.data_positions,
                **self.diloco.state()})
        return asdict(stats)

    def counters(self) -> Dict[str, int]:
        """The job's bytes so far through this stage: this round's on top of the restored
        checkpoint's (so they survive restarts and never go back)."""
        this_round = {"allreduce_bytes": sum(s.bytes_sent for s in self.outer_stats),
                      "activation_bytes": self.wire_counter.activation_bytes,
                      "gradient_bytes": self.wire_counter.gradient_bytes}
        return {key: int(self.counters_base[key] + this_round[key]) for key in COUNTERS}

    def ping(self) -> int:
        return self.stage

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The stage's parameters on the CPU (for tests and export)."""
        with self._lock:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def close(self, timeout: float) -> None:
        """Flush the scalars and the checkpoint writes still in flight."""
        if self.scalars is not None:
            self.scalars.close()
        if self.checkpoints is not None:
            self.checkpoints.close(timeout=timeout)

    def summary(self) -> dict:
        stats = self.outer_stats
        return {"stage": self.stage, "replica": self.replica,
                "inner_steps_done": self.inner_steps_done,
                "outer_steps_done": len(stats),
                "bytes_allreduced": sum(s.bytes_sent for s in stats),
                "activation_bytes": self.wire_counter.activation_bytes,
                "gradient_bytes": self.wire_counter.gradient_bytes,
                "outer_step_seconds": sum(s.seconds for s in stats)}


def host_stage(host: StageHost) -> None:
    """Make ``host`` reachable by :func:`stage_rref` from any worker."""
    _HOSTED[host.stage] = host


def unhost_all() -> None:
    _HOSTED.clear()


def _lookup(stage: int) -> StageHost:
    try:
        return _HOSTED[stage]
    except KeyError:
        raise RuntimeError(f"this worker hosts no stage {stage} (it hosts {sorted(_HOSTED)})") from None


def stage_rref(owner: str, stage: int, timeout: float) -> rpc.RRef:
    """An RRef to the StageHost of ``stage`` owned by worker ``owner``, ready for calls.

    ``rref.rpc_async().method()`` first asks the owner for the RRef's type and, until the
    answer is cached, makes the call from the thread that receives it, where the caller's
    distributed-autograd context is not set: the first micro-batch's hop would then go
    unrecorded and its stages get no gradients. A first blocking call here caches the
    type (and checks that the owner hosts the stage we expect)."""
    rref = rpc.remote(owner, _lookup, args=(stage,), timeout=timeout)
    hosted = rref.rpc_sync(timeout=timeout).ping()
    if hosted != stage:
        raise RuntimeError(f"{owner} hosts stage {hosted}, expected stage {stage}")
    return rref
