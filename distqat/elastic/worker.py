"""One worker's round, start to end: form the round, host a stage, drive a replica or
wait, leave.

Every worker runs the same code; :mod:`.round` says why the order of collective calls
matters. A worker plays one role of the plan: the driver of a replica (it also hosts that
replica's stage 0), the host of a later stage, or a spare.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict
from statistics import fmean
from typing import Iterable, Optional

import psutil
import torch
import torch.distributed as dist

from ..balance import Balancer
from ..checkpoint import state_digest
from ..config import CONFIG_FILE, Config, job_id, save_config, to_yaml
from ..data import make_objective, make_task
from ..devices import configure_cpu
from ..fileio import torch_save, write_json
from ..monitor.live import LiveFile
from ..monitor.summary import (ReplicaReport, get_reports, last_window, put_report,
                               summarize, write_summary)
from ..monitor.tensorboard import Scalars, final_metrics, run_hparams
from ..pipeline.build import IO_FILE, build_stage_host, resolve_device, uses_qat
from ..pipeline.driver import PipelineDriver
from ..pipeline.loop import run_replica
from ..pipeline.stage import StageHost, stage_rref, unhost_all
from . import dist as dq_dist
from . import history, restore
from .control import STOP, JobControl, RoundEnded, agent_started
from .liveness import Liveness
from .history import FleetKeeper
from .round import Marks, Round, form_round

log = logging.getLogger(__name__)

DONE_PREFIX = "distqat/done/"
POLL_S = 0.2
SAVED_DIR = "saved"  # snapshots asked for with ``distqat.status --save``


class Worker:
    """One worker in one round. It owns the round (store, plan, groups, RPC agent), the
    stage it hosts (``host``, None on a spare), its end of the job's control channel
    (``control``), and on a driver its replica's report; :meth:`close` leaves the round
    and, on rank 0, writes ``summary.json``."""

    def __init__(self, cfg: Config, env: dq_dist.DistEnv):
        self.cfg = cfg
        self.env = env
        self.device = resolve_device(cfg.device, env.local_rank)
        if self.device.type == "cuda":  # before any CUDA call: NCCL and autocast use it
            torch.cuda.set_device(self.device)
        self.round: Optional[Round] = None
        self.host: Optional[StageHost] = None
        self.report: Optional[ReplicaReport] = None
        self.control: Optional[JobControl] = None
        self.stop_agreed = False
        self.exit_reason = "running"
        self.started = time.time()

    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        marks: Marks = [("process start", psutil.Process().create_time()), ("setup", time.time())]
        configure_cpu(cfg)
        rnd = self.round = form_round(cfg, env, self.device, marks)
        self.control = JobControl(cfg.run_path, rnd.store, since=agent_started(),
                                  liveness=Liveness(rnd.store, env.rank, env.world_size,
                                                    lost_after=cfg.comm.lost_after),
                                  needed=[r.rank for r in rnd.plan.roles if not r.is_spare],
                                  on_broken=self.leave_now).start()
        role = rnd.role
        state = restore.exchange(rnd.decision, rnd.checkpoint_folders, env.rank, role.stage)
        marks.append(("restore", time.time()))
        if not role.is_spare:
            self.host = build_stage_host(cfg, stage=role.stage, replica=role.replica,
                                         io=rnd.io, group=rnd.groups[role.stage], state=state,
                                         device=self.device,
                                         checkpoint_folders=rnd.checkpoint_folders,
                                         cuts=rnd.cuts)
            group = rnd.groups[role.stage]
            if group is not None:
                self.host.group_replicas = [rnd.plan.role(rank).replica for rank
                                            in dist.get_process_group_ranks(group)]
        # every stage is hosted before anyone asks for an RRef to it, and every stage
        # knows its successor before any driver starts
        dist.barrier()
        if self.host is not None:
            ranks = rnd.plan.replica_ranks(role.replica)
            nxt = role.stage + 1
            self.host.connect_next(
                stage_rref(dq_dist.worker_name(ranks[nxt]), nxt, cfg.comm.rpc_timeout)
                if nxt < len(ranks) else None)
        dist.barrier()
        marks.append(("stages ready", time.time()))
        log.info("round set up: %s", ", ".join(
            f"{name} +{t - marks[i][1]:.2f}s" for i, (name, t) in enumerate(marks[1:])))

    def run(self) -> None:
        role = self.round.role
        if role.is_driver:
            self._drive(role.replica)
        elif role.is_spare:
            self._wait_done(range(self.round.plan.num_replicas))
        else:
            self._wait_done([role.replica], watch=self.host)
        end = self.control.end_at()
        if end is not None and end["reason"] != STOP:
            raise RoundEnded(f"the round ends after outer step {end['outer']}: {end['reason']}")
        self.control.leave_together(self.env.world_size,
                                    timeout=3 * self.control.liveness.lost_after)
        self.stop_agreed = end is not None
        stopped = self.stop_agreed and end["outer"] < self.cfg.diloco.outer_steps
        self.exit_reason = "stopped" if stopped else "completed"

    def _drive(self, replica: int) -> None:
        cfg, rnd = self.cfg, self.round
        rest = [stage_rref(dq_dist.worker_name(rank), stage, timeout=cfg.comm.rpc_timeout)
                for stage, rank in enumerate(rnd.plan.replica_ranks(replica)) if stage > 0]
        driver = PipelineDriver(self.host, rest, objective=make_objective(cfg.data),
                                num_microbatches=cfg.model_pipeline.num_microbatches,
                                rpc_timeout=cfg.comm.rpc_timeout, dtype=getattr(torch, cfg.dtype),
                                eval_chunk=cfg.diloco.batch_size_per_step,
                                schedule=cfg.model_pipeline.schedule)
        keeper = None
        if replica == 0:  # replica 0's driver keeps the job's history
            keeper = FleetKeeper(cfg.run_path, fresh_job=rnd.decision.fresh and not rnd.restarted)
            keeper.round_started(world_size=self.env.world_size,
                                 num_replicas=rnd.plan.num_replicas,
                                 resumed_from=rnd.decision.outer_step,
                                 inner_steps=cfg.diloco.inner_steps, config_yaml=to_yaml(cfg),
                                 roles=[None if r.is_spare else [r.stage, r.replica]
                                        for r in rnd.plan.roles])
        self.report = ReplicaReport(replica)
        window = last_window(cfg.diloco.inner_steps)
        balancer = None
        if cfg.diloco.balance != "off" and rnd.plan.num_replicas > 1:
            balancer = Balancer(rnd.store, replica, rnd.plan.num_replicas,
                                cfg.diloco.batch_size_per_step,
                                minimum=min(cfg.model_pipeline.num_microbatches,
                                            cfg.diloco.batch_size_per_step),
                                every=cfg.diloco.balance_every, mode=cfg.diloco.balance,
                                inner_steps=cfg.diloco.inner_steps,
                                tolerance=cfg.diloco.balance_tolerance,
                                timeout=cfg.diloco.averaging_timeout + cfg.comm.rpc_timeout)

        def publish(report: ReplicaReport) -> None:
            put_report(rnd.store, report)
            if keeper is not None and report.losses:
                keeper.outer_step(fmean(report.losses[-window:]),
                                  lambda: get_reports(rnd.store, rnd.plan.num_replicas))

        scalars = Scalars(cfg.run_path, f"replica{replica}")
        live = LiveFile(cfg.run_path, replica, job=job_id(), inner_steps=cfg.diloco.inner_steps,
                        outer_steps=cfg.diloco.outer_steps)
        try:
            task = rnd.task if rnd.task is not None else make_task(cfg.data)
            run_replica(driver, task, cfg, replica, scalars=scalars,
                        show_progress=self.env.rank == 0,
                        evaluates=replica == 0 and cfg.eval_every > 0, publish=publish,
                        outer_timeout=cfg.diloco.averaging_timeout + cfg.comm.rpc_timeout,
                        start_outer=rnd.decision.outer_step, report=self.report,
                        calibrate=rnd.decision.fresh and uses_qat(cfg),
                        on_first_step=keeper.first_step if keeper else None,
                        on_progress=live.write, control=self.control,
                        save=(lambda outer: self._save_snapshot(driver, outer))
                        if replica == 0 else None,
                        num_replicas=rnd.plan.num_replicas, balancer=balancer,
                        positions=self.host.data_positions)
        finally:
            scalars.close()
        if keeper is not None:
            keeper.close_pending()
        end = self.control.end_at()
        self.report.stage_digests = [state_digest(s) for s in driver.state_dicts()]
        put_report(rnd.store, self.report)
        if replica == 0 and (end is None or end["reason"] == STOP):
            self._save_final(driver)
        rnd.store.set(DONE_PREFIX + str(replica), "1")

    def _save_final(self, driver: PipelineDriver) -> None:
        """The trained stages (replica 0; all replicas are equal after the outer step)."""
        self._write_stages(driver, self.cfg.run_path)

    def _save_snapshot(self, driver: PipelineDriver, outer_step: int) -> None:
        """What ``distqat.status --save`` asks for: the stages right after ``outer_step``,
        in the layout of a finished run (``final/``, ``config.yaml``, ``model_io.json``), so
        ``python -m distqat.export`` reads it as it is."""
        folder = self.cfg.run_path / SAVED_DIR / f"outer{outer_step:06d}"
        partial = folder.with_name(f".{folder.name}.partial")  # the folder appears complete
        shutil.rmtree(partial, ignore_errors=True)
        self._write_stages(driver, partial)
        save_config(self.cfg, partial / CONFIG_FILE)
        write_json(partial / IO_FILE, self.round.io)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        log.warning("saved the stages of outer step %d in %s", outer_step, folder)

    @staticmethod
    def _write_stages(driver: PipelineDriver, folder) -> None:
        for stage, state in enumerate(driver.state_dicts()):
            torch_save(folder / "final" / f"stage{stage}.pt", state)

    def _wait_done(self, replicas: Iterable[int], watch: Optional[StageHost] = None) -> None:
        """Wait for the drivers of ``replicas`` to finish. A stage host whose driver has
        been silent longer than any single call may take gives up with an error."""
        keys = [DONE_PREFIX + str(r) for r in replicas]
        silence_limit = self.cfg.comm.rpc_timeout + self.cfg.diloco.averaging_timeout
        while not self.round.store.check(keys):
            if watch is not None and time.monotonic() - watch.last_contact > silence_limit:
                raise RuntimeError(f"the driver of replica {watch.replica} has been silent "
                                   f"for more than {silence_limit:.0f} s")
            time.sleep(POLL_S)

    def leave_now(self, reason: str) -> None:
        """Leave a round that cannot finish (a member holding a stage hangs), from the
        control thread: the main thread may be blocked in a call that would only time out
        after ``rpc_timeout``. The agent sees the exit and forms the next round."""
        log.error("leaving the round now: %s", reason)
        self.record_stop(reason)
        logging.shutdown()
        os._exit(1)

    def record_stop(self, reason: str) -> None:
        """Leave a note for the next round (see :mod:`distqat.elastic.history`)."""
        report = self.report
        history.record_stop(self.cfg.run_path, self.env.rank, reason,
                            replica=report.replica if report else None,
                            inner_step=report.inner_steps_done if report else None,
                            loss_after_outer=report.loss_after_outer if report else None)

    def close(self) -> None:
        """Leave the round. Rank 0 hosts the store, so it stays until the others have
        read what they need, then writes the summary."""
        started = time.time()
        graceful = self.exit_reason in ("completed", "stopped")
        if self.control is not None:
            self.control.close()
            if graceful and self.stop_agreed:  # the stop was acted on (maybe at the end)
                self.control.consume_stop()
        if self.host is not None:
            try:
                self.host.close(timeout=self.cfg.comm.rpc_timeout)
            except Exception as e:
                log.error("checkpoint writing failed: %s", e)
        if self.round is not None:
            dq_dist.shutdown_rpc(graceful, timeout=self.cfg.comm.rpc_timeout)
        unhost_all()
        if self.env.rank == 0 and self.round is not None:
            try:
                self._write_summary()
            except Exception as e:  # the summary must not hide the real exit reason
                log.error("could not write the summary: %s", e)
        if graceful:
            dq_dist.destroy_groups()
        log.info("left the round in %.2f s (%s)", time.time() - started, self.exit_reason)

    def _write_summary(self) -> None:
        cfg, rnd = self.cfg, self.round
        reports = get_reports(rnd.store, rnd.plan.num_replicas)
        summary = summarize(run_id=job_id(), mode=cfg.mode,
                            experiment_prefix=cfg.experiment_prefix, plan=rnd.plan,
                            inner_steps=cfg.diloco.inner_steps, reports=list(reports.values()),
                            exit_reason=self.exit_reason, started=self.started,
                            history=history.load(cfg.run_path))
        write_summary(cfg.run_path, asdict(summary))
        fleet = Scalars(cfg.run_path, "fleet")
        fleet.hparams(run_hparams(cfg), final_metrics(asdict(summary)), summary.inner_steps_done)
        fleet.close()
