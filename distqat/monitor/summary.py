"""What a run reports: each replica's :class:`ReplicaReport` (published through the
round's store after every outer step, so rank 0 can write the summary even when a run is
cut short) and the job's :class:`Summary` (``summary.json``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import fmean
from typing import Any, Dict, List, Optional

from ..fileio import read_json, write_json

REPORT_PREFIX = "distqat/report/"
SUMMARY_FILE = "summary.json"
SUMMARY_KEYS = ("world_size", "num_stages", "num_replicas", "inner_steps_done",
                "outer_steps_done", "loss_first", "loss_last", "samples_per_s",
                "bytes_allreduced", "exit_reason")
LAST_WINDOW = 10  # loss_last averages at most this many of the last inner steps


@dataclass
class ReplicaReport:
    """One replica's progress in this round, as its driver sees it."""

    replica: int
    inner_steps_done: int = 0
    outer_steps_done: int = 0
    losses: List[float] = field(default_factory=list)
    samples: int = 0
    train_seconds: float = 0.0
    bytes_allreduced: int = 0
    activation_bytes: int = 0
    gradient_bytes: int = 0
    evals: List[Dict[str, float]] = field(default_factory=list)
    # the loss of the first inner step after each recent outer step: the loss the resumed
    # model has again on the same batch (distqat.elastic.history pairs them)
    loss_after_outer: Dict[int, float] = field(default_factory=dict)
    # sha256 of each stage's parameters when the replica finished (replicas of a stage
    # must agree: DiLoCo's outer step leaves them bit-identical)
    stage_digests: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ReplicaReport":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in known})
        # JSON made the step keys strings
        report.loss_after_outer = {int(k): v for k, v in report.loss_after_outer.items()}
        return report

    def public(self) -> Dict[str, Any]:
        """The report as the summary lists it (per-step figures left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("losses", "loss_after_outer")}


def put_report(store, report: ReplicaReport) -> None:
    store.set(f"{REPORT_PREFIX}replica{report.replica}", report.to_json())


def get_reports(store, num_replicas: int) -> Dict[int, ReplicaReport]:
    """The reports present in the store among replicas 0..num_replicas-1."""
    found = {}
    for replica in range(num_replicas):
        key = f"{REPORT_PREFIX}replica{replica}"
        if store.check([key]):
            found[replica] = ReplicaReport.from_json(store.get(key).decode())
    return found


@dataclass
class Summary:
    """``summary.json``: the job as rank 0 saw it at the end of its last round."""

    run_id: str
    mode: str
    experiment_prefix: str
    world_size: int
    num_stages: int
    num_replicas: int
    plan: str
    inner_steps_done: int
    outer_steps_done: int
    loss_first: Optional[float]
    loss_last: Optional[float]
    eval_first: Optional[Dict[str, float]]
    eval_last: Optional[Dict[str, float]]
    samples_per_s: float
    train_seconds: float
    wall_seconds: float
    bytes_allreduced: int
    activation_bytes: int
    gradient_bytes: int
    exit_reason: str
    restarts: int
    recoveries: List[Dict[str, Any]]
    rounds: List[Dict[str, Any]]
    replicas: List[Dict[str, Any]]


def last_window(inner_steps: int) -> int:
    """How many of the last inner steps ``loss_last`` averages."""
    return max(1, min(inner_steps, LAST_WINDOW))


def summarize(*, run_id: str, mode: str, experiment_prefix: str, plan, inner_steps: int,
              reports: List[ReplicaReport], exit_reason: str, started: float,
              history: Optional[Dict[str, Any]] = None) -> Summary:
    """The summary from the replicas' reports of the last round (some may be missing
    after a failure) and the job's history (``fleet.json``: rounds, restarts, recoveries,
    and the loss of replica 0's first inner step of the job; none for a baseline run)."""
    history = history or {}
    window = last_window(inner_steps)
    losses = [r.losses for r in reports if r.losses]
    evals = [e for r in reports for e in r.evals]
    return Summary(
        run_id=run_id, mode=mode, experiment_prefix=experiment_prefix,
        world_size=plan.world_size, num_stages=plan.num_stages,
        num_replicas=plan.num_replicas, plan=str(plan),
        inner_steps_done=min((r.inner_steps_done for r in reports), default=0),
        outer_steps_done=min((r.outer_steps_done for r in reports), default=0),
        loss_first=(history["loss_first"] if history.get("loss_first") is not None
                    else fmean(l[0] for l in losses) if losses else None),
        loss_last=(fmean(fmean(l[-window:]) for l in losses) if losses
                   else history.get("loss_last")),
        eval_first=evals[0] if evals else None,
        eval_last=evals[-1] if evals else None,
        samples_per_s=sum(r.samples / r.train_seconds for r in reports if r.train_seconds > 0),
        train_seconds=max((r.train_seconds for r in reports), default=0.0),
        wall_seconds=time.time() - started,
        bytes_allreduced=sum(r.bytes_allreduced for r in reports),
        activation_bytes=sum(r.activation_bytes for r in reports),
        gradient_bytes=sum(r.gradient_bytes for r in reports),
        exit_reason=exit_reason,
        restarts=history.get("restarts", 0), recoveries=history.get("recoveries", []),
        rounds=history.get("rounds", []), replicas=[r.public() for r in reports])


def write_summary(run_path: Path, summary: Dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically (a reader never sees half a file)."""
    return write_json(run_path / SUMMARY_FILE, summary)


def read_summary(run_path: Path) -> Optional[Dict[str, Any]]:
    return read_json(run_path / SUMMARY_FILE)
