"""Human-readable output: one log file per rank, warnings on stderr, a progress bar on a
terminal (tqdm turns itself off when stderr is not a terminal)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

ENV_NO_PROGRESS = "DISTQAT_NO_PROGRESS"  # "1": no progress bar even on a terminal


def setup_logging(run_path: Path, rank: int, level: int = logging.INFO) -> Path:
    """Log to ``runs/<exp>/logs/rank<N>.log``; only warnings reach stderr."""
    log_dir = run_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(path, mode="a"), stderr])
    return path


def progress_bar(total: int, label: str, initial: int = 0) -> tqdm:
    """Inner steps of a replica; silent away from a terminal or with DISTQAT_NO_PROGRESS=1."""
    disable = True if os.environ.get(ENV_NO_PROGRESS) == "1" else None
    return tqdm(total=total, initial=initial, desc=label, unit="step", disable=disable,
                dynamic_ncols=True)
