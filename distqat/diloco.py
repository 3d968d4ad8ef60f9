"""DiLoCo's outer step for one stage replica (Douillard et al., 2023).

Each stage host keeps a copy of the stage's *global* parameters (the value they had after
the last outer step) and an outer optimizer over that copy. Every ``inner_steps`` inner
steps the replicas of a stage, inside that stage's own process group:

    delta_i  = global - local_i                 (the pseudo-gradient of replica i)
    delta    = mean_i delta_i                   (one all-reduce of one flat tensor)
    global   = outer_optimizer(global, delta)   (SGD + Nesterov momentum by default)
    local_i  = global                           (every replica restarts from it)

Invariant: after :meth:`DiLoCo.outer_step` every replica of the stage holds bit-identical
parameters. It holds because all replicas start from the same global copy (the
constructor broadcasts it), the all-reduce hands every rank the same bytes, and the outer
optimizer is deterministic. Floating-point buffers (e.g. norm statistics) have no outer
optimizer; they are averaged plainly so that they stay identical too. With outer SGD at
lr 1 and no momentum the outer step is exactly plain averaging of the replicas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .config import OptimConfig

Averager = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class OuterStepStats:
    outer_step: int
    seconds: float
    bytes_allreduced: int
    pseudo_grad_norm: float


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (adamw, adam, sgd)."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def group_averager(group: Optional[dist.ProcessGroup]) -> Averager:
    """Mean over the ranks of ``group`` by one SUM all-reduce (in place)."""

    def average(flat: torch.Tensor) -> torch.Tensor:
        if group is None:
            return flat
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(dist.get_world_size(group))
        return flat

    return average


class DiLoCo:
    """Outer-step state of one replica of one stage. ``average`` is the collective (the
    stage group's mean), injected so that the algebra is testable on its own."""

    def __init__(self, module: nn.Module, outer_cfg: OptimConfig, average: Averager):
        self.module = module
        self.params: List[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self.buffers: List[torch.Tensor] = [b for b in module.buffers()
                                            if b.is_floating_point()]
        self.global_params = [p.detach().clone() for p in self.params]
        self.outer_optimizer = build_optimizer(self.global_params, outer_cfg)
        self.average = average
        self.outer_step_count = 0

    def broadcast_from(self, src: int, group: Optional[dist.ProcessGroup]) -> None:
        """Make every replica start from ``src``'s parameters (a global rank in ``group``)."""
        if group is not None:
            tensors = [p.data for p in self.params] + list(self.buffers)
            flat = _flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=src, group=group)
            for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                t.copy_(v)
        self.reset_global()

    def reset_global(self) -> None:
        with torch.no_grad():
            for g, p in zip(self.global_params, self.params):
                g.copy_(p)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps of this stage: the global copy, the outer optimizer's
        momentum and the step count (live tensors: the caller copies them)."""
        return {"outer_step": self.outer_step_count, "global_params": self.global_params,
                "buffers": self.buffers, "outer_optim": self.outer_optimizer.state_dict()}

    @torch.no_grad()
    def outer_step(self) -> OuterStepStats:
        start = time.perf_counter()
        deltas = [g - p for g, p in zip(self.global_params, self.params)]
        # one flat tensor: one collective per outer step, whatever the layer count
        flat = _flatten_dense_tensors(deltas + [b.detach() for b in self.buffers])
        nbytes = flat.numel() * flat.element_size()
        flat = self.average(flat)
        averaged = _unflatten_dense_tensors(flat, deltas + self.buffers)
        mean_deltas, mean_buffers = averaged[: len(deltas)], averaged[len(deltas):]
        norm = torch.linalg.vector_norm(flat[: sum(d.numel() for d in deltas)]).item()

        for g, d in zip(self.global_params, mean_deltas):
            g.grad = d.clone()
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.params, self.global_params):
            p.copy_(g)
        for b, v in zip(self.buffers, mean_buffers):
            b.copy_(v)
        self.outer_step_count += 1
        return OuterStepStats(self.outer_step_count, time.perf_counter() - start, nbytes, norm)
