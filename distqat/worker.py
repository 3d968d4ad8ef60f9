"""One worker's round: connect, agree on a plan, host a stage, drive a replica, report.

Every worker runs the same code. The order of collective calls below (process group,
member exchange, stage groups, RPC, barrier) is the same on every rank; it must stay so.
Nothing survives the round: torchrun restarts the workers on any membership change and
everything here is built again from the plan.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from pathlib import Path
from statistics import fmean
from typing import Any, Dict, List, Optional

import psutil
import torch
import torch.distributed as dist

from . import dist as dq_dist
from .checkpoint import CheckpointWriter
from .config import CONFIG_FILE, Config, save_config
from .data import make_task
from .build import build_model, optimizer_groups
from .diloco import DiLoCo, build_optimizer
from .quant import refresh_qparams
from .monitor import Progress, Scalars, get_reports, put_report, write_summary
from .pipeline import PipelineDriver
from .plan import Member, Plan, make_plan
from .stage import StageHost, host_stage, stage_rref, unhost_all
from .trainloop import run_replica

log = logging.getLogger(__name__)

DONE_PREFIX = "distqat/done/"
ENV_RUN_ID = "DISTQAT_RUN_ID"
POLL_S = 0.2


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def describe_self(rank: int, device: torch.device) -> Member:
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    return Member(rank=rank, host=socket.gethostname(), device=str(device), free_memory=free)


class Worker:
    def __init__(self, cfg: Config, env: dq_dist.DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_path = cfg.run_path
        self.device = resolve_device(cfg.device, env.local_rank)
        self.dtype = getattr(torch, cfg.dtype)
        self.store: Optional[dist.Store] = None
        self.plan: Optional[Plan] = None
        self.host: Optional[StageHost] = None
        self.stage_scalars: Optional[Scalars] = None
        self.checkpoints: Optional[CheckpointWriter] = None
        self.rpc_started = False
        self.exit_reason = "running"
        self.started = time.time()

    # --- setup -----------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.comm.threads_per_worker > 0:
            torch.set_num_threads(cfg.comm.threads_per_worker)
        self.store = dq_dist.connect_store(env, cfg.comm.init_timeout)
        backend = dq_dist.backend_for(self.device)
        dq_dist.init_default_group(env, self.store, backend, cfg.comm.init_timeout)
        members: List[Any] = [None] * env.world_size
        with warnings.catch_warnings():
            # torch warns about its own internal use of the gloo backend object here
            warnings.filterwarnings("ignore", message="You are using a Backend")
            dist.all_gather_object(members, describe_self(env.rank, self.device))
        self.plan = make_plan(members, cfg.model_pipeline.num_stages,
                              cfg.model_pipeline.max_replicas)
        if env.rank == 0:
            log.info("world of %d, round port %d\n%s", env.world_size, env.master_port, self.plan)
            save_config(cfg, self.run_path / CONFIG_FILE)
        groups = dq_dist.new_stage_groups(
            [self.plan.stage_ranks(s) for s in range(self.plan.num_stages)], backend,
            cfg.diloco.averaging_timeout)
        dq_dist.init_rpc(env, self.store, num_threads=cfg.comm.rpc_threads,
                         rpc_timeout=cfg.comm.rpc_timeout, init_timeout=cfg.comm.init_timeout)
        self.rpc_started = True
        role = self.plan.role(env.rank)
        if not role.is_spare:
            self.host = self._build_stage(role.stage, role.replica, groups[role.stage])
        # every stage is hosted before anyone asks for an RRef to it, and every stage
        # knows its successor before any driver starts
        dist.barrier()
        if self.host is not None:
            ranks = self.plan.replica_ranks(role.replica)
            nxt = role.stage + 1
            self.host.connect_next(
                stage_rref(dq_dist.worker_name(ranks[nxt]), nxt, cfg.comm.rpc_timeout)
                if nxt < len(ranks) else None)
        dist.barrier()

    def _build_stage(self, stage: int, replica: int, group) -> StageHost:
        cfg = self.cfg
        built = build_model(cfg, make_task(cfg.data),
                            forwards_per_step=cfg.model_pipeline.num_microbatches)
        module = built.stages[stage].to(device=self.device, dtype=self.dtype)
        diloco = DiLoCo(module, cfg.diloco.outer_optim, group,
                        wire_format=cfg.quant.wire.pseudo_grads,
                        chunk_size=cfg.quant.wire.chunk_size,
                        after_sync=lambda: refresh_qparams(module))
        # replicas start from the same weights: those of the stage's first rank
        diloco.broadcast_initial()
        scalars = self.stage_scalars = Scalars(self.run_path, f"stage{stage}-replica{replica}")
        writer = self.checkpoints = self._checkpoint_writer(stage, replica)

        def on_outer_step(host: StageHost, stats) -> None:
            scalars.add(stats.outer_step, outer_step_s=stats.seconds,
                        bytes_sent=stats.bytes_sent, pseudo_grad_norm=stats.pseudo_grad_norm,
                        activation_bytes=host.wire_counter.activation_bytes,
                        gradient_bytes=host.wire_counter.gradient_bytes)
            if writer is not None:
                writer.submit(stats.outer_step, {
                    "stage": stage, "replica": replica,
                    "inner_steps_done": host.inner_steps_done, **diloco.state()})

        optimizer = build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
        host = StageHost(stage, replica, module, optimizer=optimizer, diloco=diloco,
                         device=self.device, rpc_timeout=cfg.comm.rpc_timeout,
                         wire_format=cfg.quant.wire.activations, on_outer_step=on_outer_step)
        host_stage(host)
        log.info("hosting stage %d of replica %d (%d parameters)", stage, replica,
                 sum(p.numel() for p in module.parameters()))
        return host

    def _checkpoint_writer(self, stage: int, replica: int) -> Optional[CheckpointWriter]:
        """Checkpoints of this stage at every outer step: the replica's own local folder
        and, when configured, the shared one (every replica writes the same bytes there)."""
        pm = self.cfg.param_mirror
        if not pm.enable:
            return None
        exp = self.cfg.experiment_prefix
        folders = [Path(pm.local_dir) / exp / f"replica{replica}"]
        if pm.shared_dir:
            folders.append(Path(pm.shared_dir) / exp)
        return CheckpointWriter(folders, stage, pm.keep)

    # --- roles -----------------------------------------------------------------------
    def run(self) -> None:
        role = self.plan.role(self.env.rank)
        if role.is_driver:
            self._drive(role.replica)
        elif role.is_spare:
            self._wait_done(range(self.plan.num_replicas))
        else:
            self._wait_done([role.replica], watch=self.host)
        self.exit_reason = "completed"

    def _drive(self, replica: int) -> None:
        cfg, plan = self.cfg, self.plan
        rest = [stage_rref(dq_dist.worker_name(rank), stage, timeout=cfg.comm.rpc_timeout)
                for stage, rank in enumerate(plan.replica_ranks(replica)) if stage > 0]
        driver = PipelineDriver(self.host, rest, num_microbatches=cfg.model_pipeline.num_microbatches,
                                rpc_timeout=cfg.comm.rpc_timeout, dtype=self.dtype)
        d = cfg.diloco
        progress = (Progress(d.inner_steps * d.outer_steps, f"replica {replica}")
                    if self.env.rank == 0 else None)
        scalars = Scalars(self.run_path, f"replica{replica}")
        try:
            run_replica(driver, make_task(cfg.data), cfg, replica, scalars=scalars,
                        progress=progress, evaluates=replica == 0 and cfg.eval_every > 0,
                        publish=lambda report: put_report(self.store, f"replica{replica}",
                                                          report),
                        outer_timeout=d.averaging_timeout + cfg.comm.rpc_timeout)
        finally:
            scalars.close()
        if replica == 0:
            self._save_final(driver)
        self.store.set(DONE_PREFIX + str(replica), "1")

    def _save_final(self, driver: PipelineDriver) -> None:
        """The trained stages (replica 0; all replicas are equal after the outer step)."""
        out = self.run_path / "final"
        out.mkdir(parents=True, exist_ok=True)
        for stage, state in enumerate(driver.state_dicts()):
            torch.save(state, out / f"stage{stage}.pt")

    def _wait_done(self, replicas, watch: Optional[StageHost] = None) -> None:
        """Wait for the drivers of ``replicas`` to finish. A stage host whose driver has
        been silent longer than any single call may take gives up with an error."""
        keys = [DONE_PREFIX + str(r) for r in replicas]
        silence_limit = self.cfg.comm.rpc_timeout + self.cfg.diloco.averaging_timeout
        while not self.store.check(keys):
            if watch is not None and time.monotonic() - watch.last_contact > silence_limit:
                raise RuntimeError(f"the driver of replica {watch.replica} has been silent "
                                   f"for more than {silence_limit:.0f} s")
            time.sleep(POLL_S)

    # --- end -------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the round. Rank 0 hosts the store, so it stays until the others have
        read what they need, then writes the summary."""
        graceful = self.exit_reason == "completed"
        if self.stage_scalars is not None:
            self.stage_scalars.close()
        if self.checkpoints is not None:
            try:
                self.checkpoints.close(timeout=self.cfg.comm.rpc_timeout)
            except Exception as e:
                log.error("checkpoint writing failed: %s", e)
        if self.rpc_started:
            dq_dist.shutdown_rpc(graceful, timeout=self.cfg.comm.rpc_timeout)
        unhost_all()
        if self.env.rank == 0 and self.store is not None and self.plan is not None:
            try:
                self._write_summary()
            except Exception as e:  # the summary must not hide the real exit reason
                log.error("could not write the summary: %s", e)
        if graceful:
            dq_dist.destroy_groups()

    def _write_summary(self) -> None:
        plan = self.plan
        names = [f"replica{r}" for r in range(plan.num_replicas)]
        reports = get_reports(self.store, names)
        fleet = Scalars(self.run_path, "fleet")
        fleet.add(0, world_size=self.env.world_size, complete_pipelines=len(reports))
        fleet.close()
        write_summary(self.run_path, summarize(self.cfg, plan, list(reports.values()),
                                               self.exit_reason, self.started))


def summarize(cfg: Config, plan: Plan, reports: List[Dict[str, Any]], exit_reason: str,
              started: float) -> Dict[str, Any]:
    """summary.json from the replicas' reports (some may be missing after a failure)."""
    window = max(1, min(cfg.diloco.inner_steps, 10))
    losses = [r["losses"] for r in reports if r["losses"]]
    evals = [e for r in reports for e in r["evals"]]
    seconds = [r["train_seconds"] for r in reports if r["train_seconds"] > 0]
    return {
        "run_id": os.environ.get(ENV_RUN_ID, ""),
        "mode": cfg.mode,
        "experiment_prefix": cfg.experiment_prefix,
        "world_size": plan.world_size,
        "num_stages": plan.num_stages,
        "num_replicas": plan.num_replicas,
        "plan": str(plan),
        "inner_steps_done": min((r["inner_steps_done"] for r in reports), default=0),
        "outer_steps_done": min((r["outer_steps_done"] for r in reports), default=0),
        "loss_first": fmean(l[0] for l in losses) if losses else None,
        "loss_last": fmean(fmean(l[-window:]) for l in losses) if losses else None,
        "eval_first": evals[0] if evals else None,
        "eval_last": evals[-1] if evals else None,
        "samples_per_s": sum(r["samples"] / r["train_seconds"] for r in reports
                             if r["train_seconds"] > 0),
        "train_seconds": max(seconds, default=0.0),
        "wall_seconds": time.time() - started,
        "bytes_allreduced": sum(r["bytes_allreduced"] for r in reports),
        "activation_bytes": sum(r.get("activation_bytes", 0) for r in reports),
        "gradient_bytes": sum(r.get("gradient_bytes", 0) for r in reports),
        "exit_reason": exit_reason,
        "replicas": [{k: v for k, v in r.items() if k != "losses"} for r in reports],
    }
