"""A real SLURM cluster on this machine for the tests: munged, slurmctld and N slurmd
"nodes" (Debian's slurm-wlm), all in a temporary folder and ended by PID.

Nothing global is touched: munged runs with its own key and socket in the folder
(``AuthInfo=socket=...`` points SLURM at it), the daemons take free ports on 127.0.0.1,
and client tools find the cluster through ``SLURM_CONF`` (see :meth:`env`). The recipe
and its measured figures are in RECIPES.md ("A real SLURM on one machine").

Every daemon is started with ``DISTQAT_SLURM_CLUSTER=<tag>`` and ``DISTQAT_SLURM_NODE``
in its environment; the ``slurmstepd`` processes a ``slurmd`` starts inherit them, and a
job's tasks carry ``SLURMD_NODENAME``. That is how :meth:`kill_node` finds what runs on
one node and :meth:`close` finds everything, without killing by name.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from distqat.elastic.dist import free_port

CLUSTER_VAR = "DISTQAT_SLURM_CLUSTER"
NODE_VAR = "DISTQAT_SLURM_NODE"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
CMD_TIMEOUT = 30

CONF = """\
ClusterName=distqat-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={dir}/spool/ctld
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# short timeouts: a killed node is noticed in seconds, a requeued job restarts promptly
SlurmdTimeout=6
MessageTimeout=5
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools() -> List[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, base: Path, nodes: Sequence[str] = ("n1", "n2", "n3"), cpus: int = 2):
        self.dir = Path(base)
        self.nodes = list(nodes)
        self.cpus = cpus
        self.tag = uuid.uuid4().hex
        self.munged: Optional[subprocess.Popen] = None
        self.ctld: Optional[subprocess.Popen] = None
        self.slurmd: Dict[str, subprocess.Popen] = {}
        self.jobs: List[str] = []
        self.conf = self.dir / "slurm.conf"

    # ---- start / stop
    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment of client tools (and so of submitted jobs)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def _daemon_env(self, node: str = "") -> Dict[str, str]:
        return self.env({CLUSTER_VAR: self.tag, NODE_VAR: node})

    def start(self, timeout: float = 60) -> None:
        """munged, slurmctld, then every slurmd; returns once every node is idle (~2 s)."""
        for sub in ("munge", "spool/ctld", "run", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        munge = self.dir / "munge"
        munge.chmod(0o711)  # the socket must be reachable by every user a job runs as
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = munge / "munge.socket"
        self.munged = self._spawn(
            ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
             f"--seed-file={munge}/munged.seed"], "munged")
        self._wait(lambda: sock.exists(), 10, "munged to create its socket")
        ports = [free_port() for _ in range(len(self.nodes) + 1)]
        host = socket.gethostname()
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory=2000" for n, p in zip(self.nodes, ports[1:]))
        self.conf.write_text(CONF.format(host=host, user=pwd.getpwuid(os.getuid()).pw_name,
                                         ctld_port=ports[0], munge_socket=sock, dir=self.dir,
                                         nodes=node_lines))
        self.ctld = self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            self.start_node(node)
        self.wait_nodes_idle(timeout)

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        self._wait(lambda: set(self.node_states().values()) == {"IDLE"} and
                   len(self.node_states()) == len(self.nodes), timeout,
                   "every node to be idle")

    def start_node(self, node: str) -> None:
        """(Re)start ``node``'s slurmd; with ReturnToService=2 a node marked down comes
        back as soon as it registers."""
        self.slurmd[node] = self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                                        f"slurmd-{node}", node=node)

    def _spawn(self, argv: List[str], name: str, node: str = "") -> subprocess.Popen:
        out = open(self.dir / "log" / f"{name}.out", "a")
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=self._daemon_env(node), start_new_session=True)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for p in (self.munged, self.ctld):
                if p is not None and p.poll() is not None:
                    raise SlurmError(f"{p.args[0]} exited ({p.returncode}) while waiting "
                                     f"for {what}:\n{self.log_tails()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout} s waiting for {what}:\n"
                                 f"{self.log_tails()}")
            time.sleep(0.3)

    def close(self) -> None:
        """Cancel the jobs, then end every process of the cluster by PID."""
        if self.ctld is not None and self.ctld.poll() is None and self.jobs:
            self.run("scancel", *self.jobs, check=False)
        for proc in self.processes():
            _kill(proc)
        for p in [*self.slurmd.values(), self.ctld, self.munged]:
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait(timeout=10)

    def processes(self) -> List[psutil.Process]:
        """Every live process of this cluster: daemons, slurmstepd, job tasks and their
        descendants (torchrun's workers run in sessions of their own)."""
        return self._find(lambda env: env.get(CLUSTER_VAR) == self.tag or
                          (env.get("SLURM_CONF") == str(self.conf) and
                           "SLURM_JOB_ID" in env))

    def node_processes(self, node: str) -> List[psutil.Process]:
        """slurmstepd processes of ``node`` and the job tasks running there."""
        return self._find(lambda env: (env.get(CLUSTER_VAR) == self.tag and
                                       env.get(NODE_VAR) == node) or
                          (env.get("SLURM_CONF") == str(self.conf) and
                           env.get("SLURMD_NODENAME") == node))

    def _find(self, match) -> List[psutil.Process]:
        found = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if match(proc.environ()):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return list(found.values())

    def kill_node(self, node: str) -> int:
        """The node dies at once: SIGKILL to its slurmd, its slurmstepd processes and
        every job process on it. Returns how many processes were killed."""
        daemon = self.slurmd[node]
        victims = [psutil.Process(daemon.pid)] + self.node_processes(node)
        for proc in victims:
            _kill(proc)
        daemon.wait(timeout=10)
        return len(victims)

    # ---- client tools
    def run(self, *argv: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
        res = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr}")
        return res.stdout

    def sbatch(self, script: Path, *args: str, options: Sequence[str] = (),
               cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None) -> str:
        res = subprocess.run(["sbatch", "--parsable", *options, str(script), *args],
                             cwd=cwd, env=self.env(env), capture_output=True, text=True,
                             timeout=CMD_TIMEOUT)
        if res.returncode != 0:
            raise SlurmError(f"sbatch exited {res.returncode}: {res.stderr}")
        job = res.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, NodeList, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job: str, states: Sequence[str], timeout: float) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job} is {info.get('JobState')} after {timeout} s, "
                                 f"not in {list(states)}:\n{info}")
            time.sleep(0.5)

    def node_states(self) -> Dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return {n: s.upper().rstrip("*~#") for n, s in
                (line.split() for line in out.splitlines() if line.strip())}

    def node_addr(self, node: str) -> str:
        out = self.run("scontrol", "show", "node", node)
        return re.search(r"NodeAddr=(\S+)", out).group(1)

    def log_tails(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted((self.dir / "log").glob("*")) if p.is_file())


def _kill(proc: psutil.Process) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass
