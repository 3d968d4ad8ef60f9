"""Several simulated hosts on one machine: one torchrun agent each (through
``launch/host.sh``, found beside this file), killed and added at will. Test and demo
tooling, not library code: used by the failover demo, the failover benchmark and the
elastic tests.

A "host" is an agent and the workers it starts. torchrun starts workers in sessions of
their own, so killing a host kills the agent *and* the workers found under it before the
kill (RECIPES.md). Every process is ended by its PID; nothing is killed by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

HOST_SH = Path(__file__).resolve().parent / "host.sh"


class LocalCluster:
    def __init__(self, workdir: Path, endpoint: str, *, job_id: str, backend: str = "c10d",
                 nnodes: str = "2:3", nproc_per_node: int = 2, args: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None):
        self.workdir = Path(workdir)
        self.endpoint = endpoint
        self.job_id = job_id
        self.backend = backend
        self.nnodes = nnodes
        self.nproc_per_node = nproc_per_node
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("DISTQAT_NO_PROGRESS", "1")
        self.hosts: List[subprocess.Popen] = []
        self.logs: List[Path] = []
        self.timeline: List[tuple] = []  # (time, event)

    def add_host(self) -> subprocess.Popen:
        """Start one more agent (a host joining)."""
        i = len(self.hosts)
        log = self.workdir / f"host{i}.log"
        proc = subprocess.Popen(
            ["bash", str(HOST_SH), "--rdzv-endpoint", self.endpoint, "--rdzv-backend",
             self.backend, "--nnodes", self.nnodes, "--nproc-per-node",
             str(self.nproc_per_node), "--rdzv-id", self.job_id, *self.args],
            cwd=self.workdir, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.hosts.append(proc)
        self.logs.append(log)
        self.timeline.append((time.time(), f"host{i} started"))
        return proc

    def add_store_host(self, timeout: float = 60) -> subprocess.Popen:
        """Start the first agent and wait until it listens on the endpoint: with plain
        c10d, the agent that binds it hosts the rendezvous store, and the others must not
        race it there (each host first checks the config, which takes a few seconds)."""
        proc = self.add_host()
        host, port = self.endpoint.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the first agent did not bind {self.endpoint}:\n"
                                       f"{self.log_tails()}") from None
                time.sleep(0.1)

    def kill_host(self, proc: subprocess.Popen) -> None:
        """The host dies at once: SIGKILL to its agent and every worker under it."""
        try:
            parent = psutil.Process(proc.pid)
            victims = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)
        self.timeline.append((time.time(), f"host{self.hosts.index(proc)} killed"))

    def alive(self) -> List[subprocess.Popen]:
        return [p for p in self.hosts if p.poll() is None]

    def wait(self, timeout: float) -> bool:
        """Wait for every live agent to finish; False if some ran past ``timeout``."""
        deadline = time.monotonic() + timeout
        for proc in self.alive():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def close(self) -> None:
        """End everything still running (agents and their workers), by PID."""
        for proc in self.hosts:
            if proc.poll() is None:
                self.kill_host(proc)

    def outer_step_reached(self) -> int:
        """Newest outer step any stage host has checkpointed (0 before the first)."""
        steps = [int(p.name.split("step")[1][:8])
                 for p in (self.workdir / "checkpoints").rglob("stage0-step*.pt")]
        return max(steps, default=0)

    def log_tails(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in self.logs)
