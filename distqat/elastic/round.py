"""Forming one elastic round: connect, describe ourselves, agree on a plan and on what to
resume from, make the stage groups, start RPC.

Every worker runs the same collective calls in the same order (process group, member
exchange, stage groups, RPC); it must stay so. Nothing survives a round: torchrun restarts
the workers on any membership change and all of this is formed again from the plan.
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil
import torch
import torch.distributed as dist

from ..config import CONFIG_FILE, Config, job_id, save_config
from ..data import Task, make_task
from ..fileio import write_json
from ..pipeline.build import IO_FILE, kept_stage_cuts
from ..plan import Member, Plan, Role, make_plan
from . import dist as dq_dist
from . import restore

log = logging.getLogger(__name__)

Marks = List[Tuple[str, float]]  # (phase, time it ended): the round's set-up timeline


@dataclass
class Round:
    """One round as this rank sees it; every rank holds the same plan and decision."""

    env: dq_dist.DistEnv
    store: dist.Store
    plan: Plan
    decision: restore.Decision
    restarted: bool  # some member's agent has restarted its workers before: not a new job
    groups: List[Optional[dist.ProcessGroup]]  # per stage; None where this rank is outside
    checkpoint_folders: List[Path]
    io: Dict[str, Any]  # what the task tells the model builder (the same on every rank)
    cuts: List[int]  # the stages' block boundaries (pipeline.build.stage_cuts)
    task: Optional[Task]  # rank 0 loaded it to learn ``io``; others load theirs if they drive

    @property
    def role(self) -> Role:
        return self.plan.role(self.env.rank)


def checkpoint_folders(cfg: Config) -> List[Path]:
    """This host's checkpoint folder and, when configured, the shared one (per job)."""
    pm = cfg.param_mirror
    if not pm.enable:
        return []
    scope = Path(cfg.experiment_prefix) / job_id()
    return [Path(pm.local_dir) / scope] + ([Path(pm.shared_dir) / scope]
                                           if pm.shared_dir else [])


def describe_self(env: dq_dist.DistEnv, device: torch.device, holds) -> Member:
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    return Member(rank=env.rank, host=socket.gethostname(), device=str(device),
                  free_memory=free, holds=holds, restarts=env.restart_count)


def form_round(cfg: Config, env: dq_dist.DistEnv, device: torch.device, marks: Marks) -> Round:
    """Connect to the round and agree on everything; appends each phase to ``marks``."""
    store = dq_dist.connect_store(env, cfg.comm.init_timeout)
    dq_dist.init_default_group(env, store, cfg.comm.init_timeout)
    marks.append(("process group", time.time()))
    folders = checkpoint_folders(cfg)
    num_stages = cfg.model_pipeline.num_stages
    holds = restore.holdings(folders, num_stages) if folders else ()
    members: List[Any] = [None] * env.world_size
    # torch's object collectives warn about torch's own internal use of the backend
    warnings.filterwarnings("ignore", message="You are using a Backend")
    dist.all_gather_object(members, describe_self(env, device, holds))
    plan = make_plan(members, num_stages, cfg.model_pipeline.max_replicas)
    restarted = any(m.restarts > 0 for m in members)
    decision = restore.choose(members, num_stages, restarted=restarted,
                              mirror_enabled=cfg.param_mirror.enable,
                              allow_fresh=cfg.param_mirror.allow_fresh_start)
    # rank 0 reads the data once and tells everyone its shape (a stage host that does not
    # drive never loads the data), and where the stages are cut (kept from the last round)
    task = make_task(cfg.data) if env.rank == 0 else None
    box = [None]
    if task is not None:
        io = task.model_io()
        box = [(io, kept_stage_cuts(cfg, io))]
    dist.broadcast_object_list(box, src=0)
    io, cuts = box[0]
    if env.rank == 0:
        log.info("world of %d, round store %s, %s\n%s", env.world_size,
                 env.launcher_store or f"{env.master_addr}:{env.master_port}",
                 "fresh start" if decision.fresh else
                 f"resuming from outer step {decision.outer_step}", plan)
        save_config(cfg, cfg.run_path / CONFIG_FILE)
        write_json(cfg.run_path / IO_FILE, io)
    marks.append(("plan", time.time()))
    stage_ranks = [plan.stage_ranks(s) for s in range(plan.num_stages)]
    backends = [dq_dist.stage_backend([members[r].device for r in ranks]) for ranks in stage_ranks]
    groups = dq_dist.new_stage_groups(stage_ranks, backends, cfg.diloco.averaging_timeout)
    if env.rank == 0:
        log.info("stage groups: %s", ", ".join(f"stage {s} {b}" for s, b in enumerate(backends)))
    dq_dist.init_rpc(env, store, num_threads=cfg.comm.rpc_threads,
                     rpc_timeout=cfg.comm.rpc_timeout, init_timeout=cfg.comm.init_timeout,
                     transport=cfg.comm.rpc_transport, channels=cfg.comm.rpc_channels)
    marks.append(("groups + rpc", time.time()))
    return Round(env, store, plan, decision, restarted, groups, folders, io, cuts, task)
