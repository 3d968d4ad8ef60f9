"""The job's history across elastic rounds: rounds, restarts, recoveries.

A round knows nothing of the one before it except what is on disk, so two small records
live in the run folder:

* ``events/stop-*.json``: written by every worker as it leaves a round that did not
  complete (an error, or the agent stopping it): when it noticed, and for a driver the
  inner step it had reached and the loss of its first inner step after each recent outer
  step (the loss the resumed model will have again on the same batch).
* ``fleet.json``: kept by the driver of replica 0. At its first inner step of a new round
  it turns the previous round's stop events into a recovery: seconds from the first
  notice to this first step, inner steps lost (the furthest step reached minus the step
  resumed from), and replica 0's loss on the resumed step's batch before the failure
  (``loss_before``) and after the rebuild (``loss_after``): the same model on the same
  batch, so they agree when the state was carried over intact.

Both are per host: on several hosts, the history is that of the host running replica 0's
driver (the summary says so by listing the rounds it saw).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..fileio import read_json, write_json
from ..monitor.summary import ReplicaReport
from ..monitor.tensorboard import Scalars, config_text

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"
MATCH_TRIES = 3
EVENTS_DIR = "events"


def record_stop(run_path: Path, rank: int, reason: str, *, replica: Optional[int] = None,
                inner_step: Optional[int] = None,
                loss_after_outer: Optional[Dict[int, float]] = None) -> None:
    """A worker leaves a round that did not complete (a driver says how far it got, and
    the loss of its first inner step after each recent outer step)."""
    now = time.time()
    write_json(run_path / EVENTS_DIR / f"stop-{now:.6f}-rank{rank}.json",
                {"time": now, "rank": rank, "reason": reason, "replica": replica,
                 "inner_step": inner_step,
                 "loss_after_outer": {str(k): v for k, v in (loss_after_outer or {}).items()}})


def stops_since(run_path: Path, since: float) -> List[Dict[str, Any]]:
    events = [read_json(path) for path in sorted((run_path / EVENTS_DIR).glob("stop-*.json"))]
    return [e for e in events if e is not None and e.get("time", 0) > since]


def new() -> Dict[str, Any]:
    return {"rounds": [], "recoveries": [], "restarts": 0, "loss_first": None}


def load(run_path: Path) -> Dict[str, Any]:
    return read_json(run_path / FLEET_FILE) or new()


def save(run_path: Path, fleet: Dict[str, Any]) -> None:
    write_json(run_path / FLEET_FILE, fleet)


class FleetKeeper:
    """Replica 0's driver's view of the job: :meth:`round_started` once the round is set
    up, :meth:`first_step` after the round's first inner step, :meth:`outer_step` after
    every outer step."""

    def __init__(self, run_path: Path, *, fresh_job: bool):
        self.run_path = run_path
        self.fleet = new() if fresh_job else load(run_path)
        self.pending: Optional[Dict[str, Any]] = None
        self.before: Dict[int, float] = {}
        self.unmatched: Optional[Dict[str, Any]] = None  # a recovery whose losses await
        self.match_tries = 0
        self.round_step = 0  # the job's inner step this round resumes from

    def round_started(self, *, world_size: int, num_replicas: int, resumed_from: int,
                      inner_steps: int, config_yaml: str = "",
                      roles: Optional[List[Optional[List[int]]]] = None) -> None:
        """Record the round (and the recovery it is, if the job ran before); ``roles``: per
        rank, ``[stage, replica]`` or None for a spare. TensorBoard gets
        the fleet's figures at the inner step the round resumes from, and the dashboard's
        layout and the config (as text) with them."""
        rounds = self.fleet["rounds"]
        since = rounds[-1]["started"] if rounds else 0.0
        if rounds:
            stops = stops_since(self.run_path, since)
            self.fleet["restarts"] += 1
            reached = [e["inner_step"] for e in stops if e.get("inner_step") is not None]
            # each old replica's loss on the batch this round starts with (same model)
            self.before = {e["replica"]: e["loss_after_outer"][str(resumed_from)]
                           for e in stops if e.get("replica") is not None
                           and str(resumed_from) in (e.get("loss_after_outer") or {})}
            first = min(stops, key=lambda e: e["time"], default=None)
            self.pending = {
                "noticed_at": first["time"] if first else None,
                "cause": first["reason"] if first else None,
                "steps_lost": max(0, max(reached, default=0) - resumed_from * inner_steps),
                "resumed_from_outer_step": resumed_from,
                "loss_before": None, "loss_after": None, "loss_replica": None,
            }
        rounds.append({"started": time.time(), "world_size": world_size,
                       "num_replicas": num_replicas, "resumed_from_outer_step": resumed_from,
                       "roles": roles})
        save(self.run_path, self.fleet)
        self.round_step = resumed_from * inner_steps
        scalars = Scalars(self.run_path, "fleet")
        scalars.add("fleet", self.round_step, world_size=world_size,
                    complete_pipelines=num_replicas, restarts=self.fleet["restarts"])
        scalars.layout()
        if config_yaml:
            scalars.text("config", config_text(config_yaml), self.round_step)
        scalars.close()

    def first_step(self, loss: float) -> Optional[Dict[str, Any]]:
        """Close the pending recovery (if any) now that training runs again; returns it.
        In the job's first round, ``loss`` becomes the job's first loss."""
        if self.fleet.get("loss_first") is None and not self.fleet["recoveries"] \
                and self.pending is None:
            self.fleet["loss_first"] = loss
            save(self.run_path, self.fleet)
        return self.close_pending()

    def close_pending(self) -> Optional[Dict[str, Any]]:
        """Record the pending recovery (if any) as done now: at this round's first inner
        step, or at its end when it had none to take (a job resumed at its last step)."""
        if self.pending is None:
            return None
        recovery, self.pending = self.pending, None
        noticed = recovery["noticed_at"]
        started = self.fleet["rounds"][-1]["started"]
        recovery["seconds"] = time.time() - (noticed if noticed is not None else started)
        self.fleet["recoveries"].append(recovery)
        self.unmatched = recovery
        save(self.run_path, self.fleet)
        log.warning("recovered in %.1f s, %d inner steps lost, resumed from outer step %d",
                    recovery["seconds"], recovery["steps_lost"],
                    recovery["resumed_from_outer_step"])
        scalars = Scalars(self.run_path, "fleet")
        scalars.add("fleet", self.round_step, recovery_s=recovery["seconds"],
                    steps_lost=recovery["steps_lost"])
        scalars.close()
        return recovery

    def outer_step(self, loss_last: float, reports) -> None:
        """After each outer step: keep the job's latest loss (a round resumed at the very
        end trains no step) and, while a recovery awaits its losses, look for them in the
        replicas' reports (``reports()``: replica -> :class:`ReplicaReport`)."""
        self.fleet["loss_last"] = loss_last
        save(self.run_path, self.fleet)
        if self.unmatched is not None:
            self.match_losses(reports())

    def match_losses(self, reports: Dict[int, ReplicaReport]) -> None:
        """Once the replicas have published their first outer step of the round: pair the
        lowest replica present in both rounds, its loss on the resumed batch before the
        failure and after the rebuild (the same model on the same batch). Called after
        each outer step until a pair is found (another replica may publish later), for
        at most a few outer steps. Without a pair (no survivor had reached that batch: the
        failure came right at an outer step) the loss after is still recorded, alone."""
        recovery = self.unmatched
        if recovery is None:
            return
        step = recovery["resumed_from_outer_step"]
        after = {replica: report.loss_after_outer[step] for replica, report in reports.items()
                 if step in report.loss_after_outer}
        paired = sorted(set(self.before) & set(after))
        self.match_tries += 1
        if paired:
            replica = paired[0]
            recovery.update(loss_before=self.before[replica])
        elif after and (not self.before or self.match_tries >= MATCH_TRIES):
            replica = min(after)
        else:
            if self.match_tries >= MATCH_TRIES:
                self.unmatched = None
            return
        recovery.update(loss_replica=replica, loss_after=after[replica])
        self.unmatched = None
        save(self.run_path, self.fleet)
