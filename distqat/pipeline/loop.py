"""The inner/outer loop of one replica, shared by the pipeline driver and the baseline.

A *driver* is anything with ``train_step(x, y) -> StepStats``, ``evaluate(x, y) ->
metrics``, ``calibrate(x, y)``, ``outer_step(timeout) -> list[dict]`` and ``wire_bytes() ->
(activation bytes, gradient bytes)``: the RPC pipeline
(:class:`distqat.pipeline.driver.PipelineDriver`) or the whole model in one process
(:class:`distqat.pipeline.baseline.LocalDriver`, whose outer step does nothing). Running both
through this one loop is what makes the baseline a fair reference.

A replica's data position is a sample offset into its shard (``distqat.data``). With
equal batches it is ``k * inner_steps * batch_size_per_step`` at outer step k for every
replica; with ``diloco.balance`` (:mod:`distqat.balance`) each replica advances by its own
samples (its batch size times its inner steps), and every driver keeps every replica's
position, which the outer step hands to the stages' checkpoints: a resumed round starts
each replica where it stopped reading. With ``balance: steps`` a fast replica takes more
inner steps per window than a slow one: its charts count its own steps, its reports (and
``distqat.status``) the job's, ``inner_steps`` per window.
Batches are loaded by a background thread while the model computes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from .. import faults
from ..balance import Balancer, advance
from ..config import Config
from ..data import Task
from ..data.loader import Prefetcher
from ..monitor.logs import progress_bar
from ..monitor.summary import ReplicaReport
from ..monitor.tensorboard import Scalars

if TYPE_CHECKING:  # the loop is shared with the baseline, which runs no elastic job
    from ..elastic.control import JobControl

log = logging.getLogger(__name__)


def run_replica(driver, task: Task, cfg: Config, replica: int, *, scalars: Scalars,
                show_progress: bool = False, evaluates: bool = False,
                publish: Callable[[ReplicaReport], None] = lambda report: None,
                outer_timeout: float = 0.0, start_outer: int = 0,
                report: Optional[ReplicaReport] = None, calibrate: bool = False,
                on_first_step: Optional[Callable[[float], Any]] = None,
                on_progress: Callable[[ReplicaReport], Any] = lambda report: None,
                control: Optional["JobControl"] = None,
                save: Optional[Callable[[int], Any]] = None,
                num_replicas: int = 1, balancer: Optional[Balancer] = None,
                positions: Optional[Dict[int, int]] = None) -> ReplicaReport:
    """Train ``replica`` from outer step ``start_outer`` (a resumed round) to the end, or
    to the outer step the drivers agreed to end the round after (a stop request or a lost
    member: ``control``, see :mod:`distqat.elastic.control`). ``calibrate``: set the quantizers' ranges from the
    task's calibration batch first (a fresh start with QAT). ``publish`` gets the report
    after every outer step (so a run cut short still has its last outer step's figures),
    ``on_progress`` at every logged inner step too; ``report`` (updated in place) is
    readable meanwhile; ``on_first_step(loss)`` runs after this round's first inner step.
    ``save(outer_step)`` writes a snapshot when a save request is pending (replica 0).
    ``num_replicas``: replicas in the round; ``balancer``: batch sizes or inner steps
    matched to the replicas' speeds (``diloco.balance``); ``positions``: every replica's
    data position at ``start_outer`` (from the restored checkpoint; by default the
    equal-batch position)."""
    d = cfg.diloco
    report = ReplicaReport(replica) if report is None else report
    if calibrate:
        driver.calibrate(*task.calibration_batch(d.batch_size_per_step))
    eval_x, eval_y = task.eval_set() if evaluates else (None, None)

    def evaluate(outer_step: int) -> None:
        metrics = driver.evaluate(eval_x, eval_y)
        report.evals.append({"outer_step": outer_step, **metrics})
        scalars.add("eval", outer_step * d.inner_steps, **metrics)
        log.info("eval at outer step %d: %s", outer_step,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    if evaluates:
        evaluate(start_outer)
    step = start_outer * d.inner_steps
    report.inner_steps_done = step
    report.outer_steps_done = start_outer
    publish(report)
    progress = progress_bar(d.inner_steps * d.outer_steps, f"replica {replica}",
                            initial=step) if show_progress else None
    if balancer is None:  # every replica: inner_steps steps of batch_size_per_step
        balancer = Balancer.fixed(replica, num_replicas, d.batch_size_per_step,
                                  d.inner_steps)
    positions = dict(positions or {})
    for r in range(num_replicas):
        positions.setdefault(r, step * d.batch_size_per_step)
    batches = Prefetcher(task, replica, positions[replica], balancer.sizes[replica])
    end_proposed = False
    try:
        for outer in range(start_outer, d.outer_steps):
            size, window_steps = balancer.sizes[replica], balancer.steps[replica]
            if batches.batch_size != size:  # rebalanced: read on from here
                batches.close()
                batches = Prefetcher(task, replica, batches.position, size)
            for window_step in range(window_steps):
                reason = control.end_wanted() if control is not None else None
                if reason is not None and not end_proposed:
                    control.propose_end(outer, reason)
                    end_proposed = True
                offset = batches.position  # the samples this replica has read so far
                fetched = time.perf_counter()
                x, y = next(batches)
                t0 = time.perf_counter()
                stats = driver.train_step(x, y)
                faults.slow_down(replica, time.perf_counter() - t0)
                elapsed = time.perf_counter() - t0
                balancer.record(stats.samples, time.perf_counter() - fetched)  # data waits too
                step += 1  # this replica's own inner steps: its charts' x axis
                # the job's inner step, in the config's steps per window (reports, status)
                job_step = (outer * d.inner_steps
                            + (window_step + 1) * d.inner_steps // window_steps)
                _record_step(report, stats, elapsed, job_step,
                             first_of_outer=outer if window_step == 0 else None)
                if on_first_step is not None and window_step == 0 and outer == start_outer:
                    on_first_step(stats.loss)
                if step % cfg.log_every == 0 or step == 1:
                    scalars.add("train", step, loss=stats.loss, batch_size=stats.samples,
                                samples_per_s=stats.samples / elapsed,
                                forward_s=stats.forward_s, backward_s=stats.backward_s,
                                inner_step_s=stats.step_s)
                    log.info("replica %d step %d offset %d loss %.4f", replica, step, offset,
                             stats.loss)
                    on_progress(report)
                if progress is not None:
                    progress.update(job_step - progress.n)
                    progress.set_postfix(loss=f"{stats.loss:.4g}", outer=outer, refresh=False)
            t0 = time.perf_counter()
            balancer.publish(outer)
            samples = balancer.window_samples()
            positions = advance(positions, samples)
            outer_stats = driver.outer_step(outer_timeout, samples=samples, positions=positions)
            balancer.rebalance(outer)
            waited = time.perf_counter() - t0
            report.train_seconds += waited
            report.outer_steps_done = outer + 1
            report.bytes_allreduced += sum(s["bytes_sent"] for s in outer_stats)
            report.activation_bytes, report.gradient_bytes = driver.wire_bytes()
            scalars.add("outer", step, wait_s=waited)
            end = control.end_at() if control is not None else None
            ending = end is not None and outer + 1 >= end["outer"]
            if evaluates and ((outer + 1) % cfg.eval_every == 0 or outer + 1 == d.outer_steps
                              or ending):
                evaluate(outer + 1)
            if save is not None and control is not None:
                request_id = control.save_wanted()
                if request_id is not None:
                    save(outer + 1)
                    control.mark_saved(request_id)
            publish(report)
            on_progress(report)
            if ending:
                log.warning("replica %d ends the round after outer step %d (%s)", replica,
                            outer + 1, end["reason"])
                break
    finally:
        batches.close()
        if progress is not None:
            progress.close()
    return report


def _record_step(report: ReplicaReport, stats, elapsed: float, job_step: int,
                 first_of_outer: Optional[int]) -> None:
    report.losses.append(stats.loss)
    report.samples += stats.samples
    report.train_seconds += elapsed
    report.inner_steps_done = job_step
    if first_of_outer is not None:
        # the loss of the global model of outer step ``first_of_outer`` on this replica's
        # next batch: a resumed round recomputes exactly this on its first step
        report.loss_after_outer = {k: v for k, v in report.loss_after_outer.items()
                                   if k >= first_of_outer - 2}
        report.loss_after_outer[first_of_outer] = stats.loss
