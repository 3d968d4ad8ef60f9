"""Each driver's progress on disk, for ``python -m distqat.status``: ``live/replica<r>.json``.

The round's store holds the replicas' reports too, but only for the job's own processes;
a file in the run folder can be read by anyone who sees the folder, with no network and
after the job has ended. Each driver rewrites its file at every logged inner step and
after every outer step (atomically, without fsync: it is a progress note, not state).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from statistics import fmean
from typing import Dict, Optional

from ..fileio import read_json, write_json
from .summary import ReplicaReport, last_window

LIVE_DIR = "live"


class LiveFile:
    """The progress file of one replica in one round. ``steps_per_s`` counts inner steps
    over wall time since this round's first write (outer-step waits included), which is
    what an ETA needs."""

    def __init__(self, run_path: Path, replica: int, *, job: str, inner_steps: int,
                 outer_steps: int):
        self.path = run_path / LIVE_DIR / f"replica{replica}.json"
        self.fixed = {"replica": replica, "job": job, "host": socket.gethostname(),
                      "pid": os.getpid(), "inner_steps": inner_steps,
                      "outer_steps": outer_steps, "round_started": time.time()}
        self._first: Optional[tuple] = None  # (time, inner step) of the round's first write

    def write(self, report: ReplicaReport) -> None:
        now, step = time.time(), report.inner_steps_done
        if self._first is None:
            self._first = (now, step)
        t0, step0 = self._first
        window = last_window(self.fixed["inner_steps"])
        write_json(self.path, {
            **self.fixed, "updated": now, "inner_steps_done": step,
            "outer_steps_done": report.outer_steps_done,
            "loss": fmean(report.losses[-window:]) if report.losses else None,
            "samples_per_s": (report.samples / report.train_seconds
                              if report.train_seconds > 0 else None),
            "steps_per_s": (step - step0) / (now - t0) if step > step0 and now > t0 else None,
            "eval": report.evals[-1] if report.evals else None,
        }, durable=False)


def read_live(run_path: Path) -> Dict[int, dict]:
    """The progress files found in ``run_path``, by replica."""
    found = {}
    for path in sorted((run_path / LIVE_DIR).glob("replica*.json")):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("replica"), int):
            found[data["replica"]] = data
    return found
