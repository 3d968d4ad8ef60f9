"""``mode: baseline``: ``{model}.full`` trained in one process on replica 0's data with the
same inner optimizer and the same loop as a pipeline replica. Every benchmark compares
against it."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..config import CONFIG_FILE, Config, job_id, save_config
from ..data import make_task
from ..data.task import Objective
from ..fileio import torch_save, write_json
from ..devices import configure_cpu
from ..diloco import build_optimizer
from ..monitor.summary import Summary, summarize, write_summary
from ..monitor.tensorboard import Scalars
from ..optim import Optimizer
from ..plan import Member, make_plan
from .build import IO_FILE, build_full, optimizer_groups, resolve_device, uses_qat
from .driver import StepStats, evaluate_in_chunks
from .loop import run_replica
from .stage import autocast, full_precision

log = logging.getLogger(__name__)


class LocalDriver:
    """The driver interface over a whole model in this process; no outer step."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, objective: Objective,
                 device: torch.device, dtype: torch.dtype, eval_chunk: int = 256,
                 precision: str = "fp32"):
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.device, self.dtype, self.eval_chunk = device, dtype, eval_chunk
        self.precision = precision

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective.prepare_input(x, self.dtype).to(self.device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return full_precision(self.model(self._input(x)))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        t0 = time.perf_counter()
        loss = self.objective.loss(self._run(x), y.to(self.device))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss.item(), len(x), t1 - t0, t2 - t1, time.perf_counter() - t2)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        self.model.eval()  # quantizers do not observe held-out data
        try:
            return evaluate_in_chunks(
                self.objective, lambda xs, ys: self.objective.eval_sums(
                    self._run(xs), ys.to(self.device)), x, y, self.eval_chunk)
        finally:
            self.model.train()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training-mode forward: the quantizers take their ranges."""
        self._run(x)

    def outer_step(self, timeout: float, **_) -> List[dict]:
        return []

    def wire_bytes(self) -> Tuple[int, int]:
        return 0, 0


def run_baseline(cfg: Config) -> Summary:
    """Train the full model; write summary.json and final/full.pt; return the summary."""
    started = time.time()
    save_config(cfg, cfg.run_path / CONFIG_FILE)
    configure_cpu(cfg)
    device = resolve_device(cfg.device, 0)
    dtype = getattr(torch, cfg.dtype)
    task = make_task(cfg.data)
    io = task.model_io()
    write_json(cfg.run_path / IO_FILE, io)
    model = build_full(cfg, io).to(device=device, dtype=dtype)
    optimizer = build_optimizer(optimizer_groups(cfg, model), cfg.diloco.inner_optim)
    driver = LocalDriver(model, optimizer, task.objective, device, dtype,
                         eval_chunk=cfg.diloco.batch_size_per_step, precision=cfg.precision)
    scalars = Scalars(cfg.run_path, "replica0")
    scalars.layout()
    exit_reason = "error"
    report = None
    try:
        report = run_replica(driver, task, cfg, 0, scalars=scalars, show_progress=True,
                             evaluates=cfg.eval_every > 0, calibrate=uses_qat(cfg))
        exit_reason = "completed"
    except KeyboardInterrupt:
        exit_reason = "interrupted"
        raise
    finally:
        scalars.close()
        plan = make_plan([Member(rank=0, host=socket.gethostname(), device=str(device))], 1)
        summary = summarize(run_id=job_id(), mode=cfg.mode,
                            experiment_prefix=cfg.experiment_prefix, plan=plan,
                            inner_steps=cfg.diloco.inner_steps,
                            reports=[report] if report else [], exit_reason=exit_reason,
                            started=started)
        write_summary(cfg.run_path, asdict(summary))
    torch_save(cfg.run_path / "final" / "full.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    return summary
