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
from . import restore
from . import fleet
from .fleet import FleetKeeper
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
from .trainloop import new_report, run_replica

log = logging.getLogger(__name__)

DONE_PREFIX = "distqat/done/"
ENV_JOB_ID = "TORCHELASTIC_RUN_ID"
POLL_S = 0.2


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def describe_self(env: dq_dist.DistEnv, device: torch.device, holds) -> Member:
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    return Member(rank=env.rank, host=socket.gethostname(), device=str(device),
                  free_memory=free, holds=holds, restarts=env.restart_count)


def job_id() -> str:
    """The job's id (torchrun's --rdzv-id): checkpoints are scoped by it, so a new job
    never resumes an old one's state by accident, and every round of one job does."""
    return os.environ.get(ENV_JOB_ID, "") or "default"


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
        self.ckpt_folders: List[Path] = []
        self.restarted = False  # some member's agent has restarted its workers before
        self.decision: Optional[restore.Decision] = None
        self.progress_report: Optional[Dict[str, Any]] = None
        self.exit_reason = "running"
        self.started = time.time()

    # --- setup -----------------------------------------------------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        marks = [("process start", psutil.Process().create_time()), ("setup", time.time())]
        if cfg.comm.threads_per_worker > 0:
            torch.set_num_threads(cfg.comm.threads_per_worker)
        self.store = dq_dist.connect_store(env, cfg.comm.init_timeout)
        backend = dq_dist.backend_for(self.device)
        dq_dist.init_default_group(env, self.store, backend, cfg.comm.init_timeout)
        marks.append(("process group", time.time()))
        self.ckpt_folders = self._checkpoint_folders()
        num_stages = cfg.model_pipeline.num_stages
        holds = restore.holdings(self.ckpt_folders, num_stages) if self.ckpt_folders else ()
        members: List[Any] = [None] * env.world_size
        # torch's object collectives warn about torch's own internal use of the backend
        warnings.filterwarnings("ignore", message="You are using a Backend")
        dist.all_gather_object(members, describe_self(env, self.device, holds))
        self.plan = make_plan(members, num_stages, cfg.model_pipeline.max_replicas)
        self.restarted = any(m.restarts > 0 for m in members)
        self.decision = restore.choose(members, num_stages, restarted=self.restarted,
                                       mirror_enabled=cfg.param_mirror.enable,
                                       allow_fresh=cfg.param_mirror.allow_fresh_start)
        if env.rank == 0:
            log.info("world of %d, round port %d, %s\n%s", env.world_size, env.master_port,
                     "fresh start" if self.decision.fresh else
                     f"resuming from outer step {self.decision.outer_step}", self.plan)
            save_config(cfg, self.run_path / CONFIG_FILE)
        marks.append(("plan", time.time()))
        groups = dq_dist.new_stage_groups(
            [self.plan.stage_ranks(s) for s in range(self.plan.num_stages)], backend,
            cfg.diloco.averaging_timeout)
        dq_dist.init_rpc(env, self.store, num_threads=cfg.comm.rpc_threads,
                         rpc_timeout=cfg.comm.rpc_timeout, init_timeout=cfg.comm.init_timeout,
                         transport=cfg.comm.rpc_transport)
        self.rpc_started = True
        marks.append(("groups + rpc", time.time()))
        role = self.plan.role(env.rank)
        state = restore.exchange(self.decision, self.ckpt_folders, env.rank, role.stage)
        marks.append(("restore", time.time()))
        if not role.is_spare:
            self.host = self._build_stage(role.stage, role.replica, groups[role.stage], state)
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
        marks.append(("stages ready", time.time()))
        log.info("round set up: %s", ", ".join(
            f"{name} +{t - marks[i][1]:.2f}s" for i, (name, t) in enumerate(marks[1:])))

    def _build_stage(self, stage: int, replica: int, group, state) -> StageHost:
        cfg = self.cfg
        built = build_model(cfg, make_task(cfg.data),
                            forwards_per_step=cfg.model_pipeline.num_microbatches)
        module = built.stages[stage].to(device=self.device, dtype=self.dtype)
        diloco = DiLoCo(module, cfg.diloco.outer_optim, group,
                        wire_format=cfg.quant.wire.pseudo_grads,
                        chunk_size=cfg.quant.wire.chunk_size,
                        after_sync=lambda: refresh_qparams(module))
        if state is not None:  # every replica of the stage gets the same restored state
            diloco.load_state(state)
        else:  # replicas start from the same weights: those of the stage's first rank
            diloco.broadcast_initial()
        scalars = self.stage_scalars = Scalars(self.run_path, f"stage{stage}-replica{replica}")
        writer = self.checkpoints = (
            CheckpointWriter(self.ckpt_folders, stage, cfg.param_mirror.keep)
            if self.ckpt_folders else None)

        def on_outer_step(host: StageHost, stats) -> None:
            scalars.add(stats.outer_step, outer_step_s=stats.seconds,
                        bytes_sent=stats.bytes_sent, pseudo_grad_norm=stats.pseudo_grad_norm,
                        activation_bytes=host.wire_counter.activation_bytes,
                        gradient_bytes=host.wire_counter.gradient_bytes)
            if writer is not None:
                writer.submit(stats.outer_step, {
                    "stage": stage, "inner_steps_done": stats.outer_step * cfg.diloco.inner_steps,
                    **diloco.state()})

        optimizer = build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
        host = StageHost(stage, replica, module, optimizer=optimizer, diloco=diloco,
                         device=self.device, rpc_timeout=cfg.comm.rpc_timeout,
                         wire_format=cfg.quant.wire.activations, on_outer_step=on_outer_step)
        host_stage(host)
        log.info("hosting stage %d of replica %d (%d parameters)", stage, replica,
                 sum(p.numel() for p in module.parameters()))
        return host

    def _checkpoint_folders(self) -> List[Path]:
        """This host's checkpoint folder and, when configured, the shared one."""
        pm = self.cfg.param_mirror
        if not pm.enable:
            return []
        scope = Path(self.cfg.experiment_prefix) / job_id()
        return [Path(pm.local_dir) / scope] + ([Path(pm.shared_dir) / scope]
                                               if pm.shared_dir else [])

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
        keeper = self._fleet_keeper() if replica == 0 else None
        self.progress_report = new_report(replica)
        try:
            run_replica(driver, make_task(cfg.data), cfg, replica, scalars=scalars,
                        progress=progress, evaluates=replica == 0 and cfg.eval_every > 0,
                        publish=lambda report: self._publish(report, keeper),
                        outer_timeout=d.averaging_timeout + cfg.comm.rpc_timeout,
                        start_outer=self.decision.outer_step, report=self.progress_report,
                        on_first_step=(lambda loss: self._first_step(keeper, loss))
                        if keeper else None)
        finally:
            scalars.close()
        if replica == 0:
            self._save_final(driver)
        self.store.set(DONE_PREFIX + str(replica), "1")

    def _fleet_keeper(self) -> FleetKeeper:
        keeper = FleetKeeper(self.run_path, fresh_job=self.decision.fresh and not self.restarted)
        keeper.round_started(world_size=self.env.world_size, num_replicas=self.plan.num_replicas,
                             resumed_from=self.decision.outer_step,
                             inner_steps=self.cfg.diloco.inner_steps)
        scalars = Scalars(self.run_path, "fleet")
        scalars.add(len(keeper.fleet["rounds"]), world_size=self.env.world_size,
                    complete_pipelines=self.plan.num_replicas,
                    restarts=keeper.fleet["restarts"])
        scalars.close()
        return keeper

    def _publish(self, report: Dict[str, Any], keeper: Optional[FleetKeeper]) -> None:
        """After every outer step: the report for rank 0's summary; replica 0 also keeps
        the job's latest loss (a round resumed at the very end trains no step)."""
        put_report(self.store, f"replica{report['replica']}", report)
        if keeper is not None and report["losses"]:
            keeper.progress(fmean(report["losses"][-last_window(self.cfg):]))
            if keeper.unmatched is not None:
                # JSON made the step keys strings; every driver publishes once per outer step
                names = [f"replica{r}" for r in range(self.plan.num_replicas)]
                found = get_reports(self.store, names)
                keeper.match_losses({int(k[len("replica"):]): v for k, v in found.items()})

    def _first_step(self, keeper: FleetKeeper, loss: float) -> None:
        recovery = keeper.first_step(loss)
        if recovery is not None:
            log.warning("recovered in %.1f s, %d inner steps lost, resumed from outer step %d",
                        recovery["seconds"], recovery["steps_lost"],
                        recovery["resumed_from_outer_step"])
            scalars = Scalars(self.run_path, "fleet")
            scalars.add(keeper.fleet["restarts"], recovery_seconds=recovery["seconds"],
                        steps_lost=recovery["steps_lost"])
            scalars.close()

    def record_stop(self, reason: str) -> None:
        """Leave a note for the next round (see distqat.fleet)."""
        report = self.progress_report
        fleet.record_stop(self.run_path, self.env.rank, reason,
                          replica=report["replica"] if report else None,
                          inner_step=report["inner_steps_done"] if report else None,
                          loss_after_outer=report["loss_after_outer"] if report else None)

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
        started = time.time()
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
        log.info("left the round in %.2f s (%s)", time.time() - started, self.exit_reason)

    def _write_summary(self) -> None:
        plan = self.plan
        names = [f"replica{r}" for r in range(plan.num_replicas)]
        reports = get_reports(self.store, names)
        write_summary(self.run_path, summarize(self.cfg, plan, list(reports.values()),
                                               self.exit_reason, self.started,
                                               fleet.load(self.run_path)))


def last_window(cfg: Config) -> int:
    """How many of the last inner steps ``loss_last`` averages."""
    return max(1, min(cfg.diloco.inner_steps, 10))


def summarize(cfg: Config, plan: Plan, reports: List[Dict[str, Any]], exit_reason: str,
              started: float, history: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """summary.json from the replicas' reports of the last round (some may be missing
    after a failure) and the job's history (``fleet.json``: rounds, restarts, recoveries,
    and the loss of replica 0's first inner step of the job)."""
    history = history or fleet.new()
    window = last_window(cfg)
    losses = [r["losses"] for r in reports if r["losses"]]
    evals = [e for r in reports for e in r["evals"]]
    seconds = [r["train_seconds"] for r in reports if r["train_seconds"] > 0]
    return {
        "run_id": job_id(),
        "mode": cfg.mode,
        "experiment_prefix": cfg.experiment_prefix,
        "world_size": plan.world_size,
        "num_stages": plan.num_stages,
        "num_replicas": plan.num_replicas,
        "plan": str(plan),
        "inner_steps_done": min((r["inner_steps_done"] for r in reports), default=0),
        "outer_steps_done": min((r["outer_steps_done"] for r in reports), default=0),
        "loss_first": (history["loss_first"] if history.get("loss_first") is not None
                       else fmean(l[0] for l in losses) if losses else None),
        "loss_last": (fmean(fmean(l[-window:]) for l in losses) if losses
                      else history.get("loss_last")),
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
        "restarts": history["restarts"],
        "recoveries": history["recoveries"],
        "rounds": history["rounds"],
        "replicas": [{k: v for k, v in r.items() if k not in ("losses", "loss_after_outer")}
                     for r in reports],
    }
