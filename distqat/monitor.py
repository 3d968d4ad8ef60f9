"""What a run shows: TensorBoard scalars, one log file per rank, a progress line on a
terminal, and the reports that become ``summary.json``.

Event files go under ``runs/<experiment>/``: ``replica<r>/`` (loss, samples/s, time split
per inner step), ``stage<s>-replica<r>/`` (outer-step time, pseudo-gradient norm, bytes)
and ``fleet/`` (rank 0: world size, pipelines). Reports travel through the round's store,
which rank 0 hosts, so rank 0 can write the summary even when a run is cut short.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch.utils.tensorboard import SummaryWriter

REPORT_PREFIX = "distqat/report/"
SUMMARY_FILE = "summary.json"
SUMMARY_KEYS = ("world_size", "num_stages", "num_replicas", "inner_steps_done",
                "outer_steps_done", "loss_first", "loss_last", "samples_per_s",
                "bytes_allreduced", "exit_reason")


def setup_logging(run_path: Path, rank: int, level: int = logging.INFO) -> Path:
    """Log to ``runs/<exp>/logs/rank<N>.log``; only warnings reach stderr."""
    log_dir = run_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(path, mode="a")
    file_handler.setFormatter(fmt)
    err_handler = logging.StreamHandler(sys.stderr)
    err_handler.setFormatter(fmt)
    err_handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(file_handler)
    root.addHandler(err_handler)
    root.setLevel(level)
    return path


class Scalars:
    """A lazily opened TensorBoard writer for one subfolder of the run."""

    def __init__(self, run_path: Path, name: str):
        self.path = run_path / name
        self._writer: Optional[SummaryWriter] = None

    def add(self, step: int, **values: float) -> None:
        if self._writer is None:
            self._writer = SummaryWriter(str(self.path))
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


class Progress:
    """One self-overwriting line on a terminal; silent when stderr is not a TTY."""

    def __init__(self, total: int, label: str, stream=None):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() and os.environ.get("DISTQAT_NO_PROGRESS") != "1"
        self.start = time.monotonic()

    def update(self, done: int, **info: Any) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / max(1, self.total))
        rate = done / max(1e-9, time.monotonic() - self.start)
        extra = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in info.items())
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{self.total} {rate:.1f} it/s  {extra}\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def put_report(store, name: str, report: Dict[str, Any]) -> None:
    store.set(REPORT_PREFIX + name, json.dumps(report))


def get_reports(store, names: List[str]) -> Dict[str, Dict[str, Any]]:
    """The reports present in the store among ``names`` (missing ones are left out)."""
    found = {}
    for name in names:
        key = REPORT_PREFIX + name
        if store.check([key]):
            found[name] = json.loads(store.get(key))
    return found


def write_summary(run_path: Path, summary: Dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically (a reader never sees half a file)."""
    run_path.mkdir(parents=True, exist_ok=True)
    path = run_path / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(run_path: Path) -> Optional[Dict[str, Any]]:
    path = run_path / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
