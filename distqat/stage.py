"""The host side of a pipeline stage: one stage of one replica, owned by one worker.

A driver reaches the stage through an RRef owned by the hosting worker (made by
:func:`stage_rref`). Calls arrive on RPC threads: ``forward`` per micro-batch, ``step``
once per inner step with the driver's distributed-autograd context, ``outer_step`` every
``inner_steps``. Activations cross the wire on the CPU (distributed autograd does not
work with CUDA device maps): the input is moved to the stage's device on arrival and the
output back to the CPU before it is returned.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Dict, Optional

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch import nn

from .config import OptimConfig
from .diloco import DiLoCo, OuterStepStats, build_optimizer

log = logging.getLogger(__name__)

# The stage this process hosts, looked up by the driver's rpc.remote(). A process-local
# table is unavoidable: RPC calls name module-level functions, not objects.
_HOSTED: Dict[int, "StageHost"] = {}


class StageHost:
    def __init__(self, stage: int, replica: int, module: nn.Module, *,
                 inner_cfg: OptimConfig, diloco: DiLoCo, device: torch.device,
                 on_outer_step=None):
        self.stage = stage
        self.replica = replica
        self.module = module
        self.device = device
        self.optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad],
                                         inner_cfg)
        self.diloco = diloco
        self.on_outer_step = on_outer_step
        # micro-batches of one replica arrive concurrently; the module runs one at a time
        self._lock = threading.Lock()
        self.inner_steps_done = 0
        self.last_contact = time.monotonic()
        self.outer_stats: list[OuterStepStats] = []

    def forward(self, x) -> torch.Tensor:
        """One micro-batch. ``x`` is a tensor or an RRef to the previous stage's output
        (fetched here, so activations go stage to stage, not through the driver)."""
        self.last_contact = time.monotonic()
        if isinstance(x, rpc.PyRRef):
            x = x.to_here()
        x = x.to(self.device)
        with self._lock:
            y = self.module(x)
        return y.cpu()

    def step(self, context_id: int) -> int:
        """The inner optimizer step with the gradients of autograd context ``context_id``."""
        self.last_contact = time.monotonic()
        grads = dist_autograd.get_gradients(context_id)
        with self._lock:
            for p in self.optimizer.param_groups[0]["params"]:
                p.grad = grads.get(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.inner_steps_done += 1
        return self.inner_steps_done

    def outer_step(self) -> dict:
        """DiLoCo's outer step; blocks until every replica of this stage has joined it."""
        self.last_contact = time.monotonic()
        with self._lock:
            stats = self.diloco.outer_step()
        self.outer_stats.append(stats)
        self.last_contact = time.monotonic()
        if self.on_outer_step is not None:
            self.on_outer_step(self, stats)
        return asdict(stats)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The stage's parameters on the CPU (for tests and export)."""
        with self._lock:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def summary(self) -> dict:
        stats = self.outer_stats
        return {"stage": self.stage, "replica": self.replica,
                "inner_steps_done": self.inner_steps_done,
                "outer_steps_done": len(stats),
                "bytes_allreduced": sum(s.bytes_allreduced for s in stats),
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


def stage_rref(owner: str, stage: int, timeout: Optional[float] = None) -> rpc.RRef:
    """An RRef to the StageHost of ``stage`` owned by worker ``owner``."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    return rpc.remote(owner, _lookup, args=(stage,), **kwargs)
