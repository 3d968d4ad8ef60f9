"""``distqat.simulate``'s predictions against real runs over throttled links.

    python bench/simulate_check.py [--hosts 2 3] [--rates 10mbit 100mbit 1gbit] [--repeats 3]
                                   [--setups fp32-h5 fp32-h25 int8-h5 int8-h25 ddp pipe]
                                   [--seconds 12] [--json OUT] [--timeout 300]
                                   [--queue-floor BYTES] [--set KEY=VALUE ...]
    python bench/simulate_check.py --repredict SAVED.json [--json OUT]
    python bench/simulate_check.py --profile-concurrency 1 2 3 [--hosts 3] [--rates 1gbit]
                                   [--setups pipe] [--repeats 2]
    python bench/simulate_check.py --part internet [--device h100] [--mfu 0.4] [--big-batch 8192]

**Testbed.** Two or three "hosts" are network namespaces (RECIPES.md), each in its own UTS
and PID namespace too, started through ``launch/host.sh`` with ``comm.interface`` on its
veth; names resolve through ``/etc/netns/<ns>/hosts`` (the machine's ``/etc/hosts`` is
untouched). A host's veth ends on a bridge of its own (its "router"), joined to a core
bridge; ``tc tbf`` on the router's two ports shapes the host's download and upload to the
rate, so every host has a full-duplex link of that rate, as :mod:`distqat.plan_cost`
models it. ``netem`` is not in this kernel, so **latency is not emulated**: the links add
~0.01-0.07 ms (measured, given to the model), and the model's latency terms are not checked
here. What had to be right for the link to be the link (each measured here):

* PID namespaces: TensorPipe's CMA channel (``process_vm_readv``) otherwise carries RPC
  tensors between processes of one machine whatever their network namespace: the
  pipeline's activations skipped the throttled link (10 Mbit/s "measured" 20x faster
  than possible). Its domain descriptor includes the PID namespace.
* Shaping where traffic is forwarded, not on the sender's own interface: a ``tbf`` there
  drops locally, which TCP answers with timer-driven retries (stalls of 0.2-0.5 s), and
  with 64 kB GSO segments it delivered 2 of 10 Mbit/s. GSO is capped at 16 kB.
* A short queue (``tbf latency 10ms``): with 100 ms, both directions of one TCP
  connection saturated (gloo's pair in a 2-rank ring) ran 4-40 % slower, at random (ACKs
  queued behind data); with 10 ms, 3-7 %. One direction reaches the model's 95 %.

**Setups**, on ``configs/tiny.yaml``'s teacher task with a 512-wide MLP (4 layers, 0.81M
parameters, 3.2 MB in fp32), batch 64, 1 thread per worker, checkpoints and eval off:

* ``fp32-h5`` / ``fp32-h25`` / ``int8-h5`` / ``int8-h25``: DiLoCo, one stage per replica,
  one replica per host, ``quant.wire.pseudo_grads`` fp32 or int8, inner_steps 5 or 25.
  Measured: seconds per outer step (per replica, ``train_seconds / outer_steps_done`` from
  ``summary.json``, median over replicas) and the fleet's samples/s.
* ``ddp``: ``bench/peers.py``'s DDP replica (``ddp_replica``: the same model, optimizer
  and data; gloo on the veth), one rank per host; seconds per step and samples/s.
* ``pipe``: one replica whose stages are on different hosts (``num_stages`` = hosts,
  gpipe, 2 micro-batches of 128): activations and their gradients cross the links.

Each run trains for about ``--seconds`` (the prediction picks the step counts). The
predictions are ``distqat.simulate``'s own functions, with stage times profiled at the
start of every round (all setups once, at one rate) by as many processes at once as the
run has workers computing at once, since the hosts share this machine's 2 cores: every
DiLoCo replica or DDP rank; a pipeline's stages only while a micro-batch is on each (3
stages and 2 micro-batches: 2), then calibrated as ``simulate --calibrate`` does
(:mod:`distqat.step_calibration`): right before each DiLoCo or pipeline run, a short
``distqat.local`` run of the same config with as many pipelines as the hosts hold, on
loopback, scales the profile's compute to its mean inner step (DDP's prediction takes the
whole model's times, not calibrated). Every process has a timeout and is ended by its PID;
namespaces, veths and ``/etc/netns/<ns>`` are removed in ``finally``.

``--repredict`` recomputes a saved check's predictions with the current cost model, from
each run's own stage times and link (kept in the file): what a change to the model does
to the same measurements.

``--profile-concurrency K ...`` measures no run: it profiles each setup's stage times by
K processes at once (the check uses as many as compute at once in the run) and prints
what each profile predicts, to see how much of a prediction is this machine's shared cores.

``--part internet`` prints predictions only: distilgpt2 and GPT-Neo 125M with the whole
model on each host, int8 pseudo-gradients every 100 inner steps, 8/64/512 hosts at
100 Mbit/s and 50 ms, against DDP; compute from this CPU (profiled, 2 threads) and from a
GPU's FLOPs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TAG_VAR = "DQS_TAG"  # every process a run starts carries it: found and ended by PID
CONFIG = ROOT / "configs" / "tiny.yaml"
COMMON = ["model_pipeline.model_args.hidden=512", "diloco.batch_size_per_step=64",
          "param_mirror.enable=false", "eval_every=0", "log_every=1000",
          "comm.threads_per_worker=1", "experiment_prefix=simcheck"]
SETUPS = {  # name: overrides (pipe: num_stages set per host count)
    "fp32-h5": ["quant.wire.pseudo_grads=fp32", "diloco.inner_steps=5"],
    "fp32-h25": ["quant.wire.pseudo_grads=fp32", "diloco.inner_steps=25"],
    "int8-h5": ["quant.wire.pseudo_grads=int8", "diloco.inner_steps=5"],
    "int8-h25": ["quant.wire.pseudo_grads=int8", "diloco.inner_steps=25"],
    "ddp": ["diloco.inner_steps=1"],
    "pipe": ["diloco.inner_steps=5", "diloco.batch_size_per_step=256",
             "model_pipeline.num_microbatches=2"],
}
BURST = {10e6: "32kb", 100e6: "64kb", 1e9: "256kb"}
GSO = 16000
# tbf's queue, as the time it holds at the rate: with 100 ms, both directions of one TCP
# connection saturated (gloo's pair in a 2-rank ring) ran 4-40 % slower than one, at
# random (ACKs queued behind data); with 10 ms, 3-7 %, and one direction at the model's 95 %
QUEUE_S = 0.010
QUEUE = f"{QUEUE_S * 1e3:g}ms"

_PORTS = iter(range(29400, 29900))  # a fresh port per job: no waiting on TIME_WAIT

DDP_WORKER = r"""
import json, os, sys, importlib.util
from datetime import timedelta
import torch, torch.distributed as dist
rank, world, master, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
spec = importlib.util.spec_from_file_location("peers", os.path.join(sys.argv[5], "bench", "peers.py"))
peers = importlib.util.module_from_spec(spec); spec.loader.exec_module(peers)
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world,
                        timeout=timedelta(seconds=120))
out = peers.ddp_replica(rank, world, sys.argv[6:], steps)
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def unavailable() -> Optional[str]:
    """Why namespaces and tc cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    return None


@dataclass
class Host:
    ns: str  # also its veth end's name: comm.interface
    peer: str  # the other end of that veth, on the host's bridge
    up: str  # the host bridge's port towards the core bridge
    addr: str
    name: str
    cwd: Path


@dataclass
class Testbed:
    """``n`` hosts on a bridge, throttled with :meth:`throttle`; use as a context manager."""

    n: int
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    hosts: List[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        pid = os.getpid() % 100000
        self.bridge = f"dqs{pid}br"
        net = f"10.77.{pid % 250}"
        self.hosts = [Host(f"dqs{pid}h{i}", f"dqs{pid}b{i}", f"dqs{pid}u{i}", f"{net}.{i + 1}",
                           f"dqs{pid}{'abc'[i]}", self.workdir / f"host{i}")
                      for i in range(self.n)]

    def __enter__(self) -> "Testbed":
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        for ns in [self.bridge] + [h.ns for h in self.hosts]:
            _ip("netns", "del", ns, check=False)  # a leftover of a killed run with this pid
            _ip("netns", "add", ns)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        names = "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        br = ("-n", self.bridge)
        for i, h in enumerate(self.hosts):
            # host veth -> its own bridge (the host's "router") -> a veth pair -> br0
            _ip("link", "add", h.ns, "type", "veth", "peer", "name", h.peer)
            _ip("link", "set", h.ns, "netns", h.ns)
            _ip("link", "set", h.peer, "netns", self.bridge)
            _ip(*br, "link", "add", f"brh{i}", "type", "bridge")
            _ip(*br, "link", "add", h.up, "type", "veth", "peer", "name", f"core{i}")
            _ip(*br, "link", "set", h.peer, "master", f"brh{i}")
            _ip(*br, "link", "set", h.up, "master", f"brh{i}")
            _ip(*br, "link", "set", f"core{i}", "master", "br0")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ns)
            for ns, dev in ((h.ns, h.ns), (self.bridge, h.peer), (self.bridge, h.up),
                            (self.bridge, f"core{i}"), (self.bridge, f"brh{i}")):
                _ip("-n", ns, "link", "set", dev, "gso_max_size", str(GSO), check=False)
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            Path(f"/etc/netns/{h.ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{h.ns}/hosts").write_text(f"127.0.0.1 localhost\n{names}")
            h.cwd.mkdir(parents=True, exist_ok=True)

    def throttle(self, rate: float, queue_floor: int = 0) -> None:
        """Every host's upload and download at ``rate`` bits/s (tbf), both shaped where
        they are forwarded (the host's bridge), not in the sender's own stack: a ``tbf``
        on the sending interface drops locally, which TCP answers with timer-driven
        retries (stalls of 0.2-0.5 s seen here). ``queue_floor``: the queue holds at least
        that many bytes (else :data:`QUEUE` of time at the rate)."""
        burst = BURST.get(rate, f"{max(32, int(rate / 8 / 250 / 1000))}kb")
        queue = ["latency", QUEUE]
        if queue_floor > rate / 8 * QUEUE_S:
            queue = ["limit", str(queue_floor)]
        for h in self.hosts:
            for dev in (h.peer, h.up):  # towards the host: download; towards br0: upload
                _tc("-n", self.bridge, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                    f"{int(rate)}bit", "burst", burst, *queue)

    def close(self) -> None:
        kill_tagged(self.tag)  # before the namespaces go: nothing of ours is left inside
        for ns in [h.ns for h in self.hosts] + [self.bridge]:
            _ip("netns", "del", ns, check=False)  # its veth ends (and the pairs) go with it
        for h in self.hosts:
            shutil.rmtree(f"/etc/netns/{h.ns}", ignore_errors=True)

    def env(self) -> dict:
        return dict(os.environ, **{TAG_VAR: self.tag, "DISTQAT_NO_PROGRESS": "1",
                                   "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": str(ROOT) + os.pathsep
                                   + os.environ.get("PYTHONPATH", "")})

    def popen(self, h: Host, cmd: Sequence[str], out: Path) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", h.ns, *cmd], cwd=h.cwd, env=self.env(),
                                stdout=open(out, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tagged(tag: str) -> None:
    """End every process started under ``tag`` (found through its environment), by PID."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TAG_VAR) == tag:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _wait_all(bed: Testbed, procs: List[subprocess.Popen], timeout: float, what: str,
              logs: List[Path], done_marker: Optional[str] = None) -> None:
    """Wait for ``procs``; a non-zero exit fails the run unless its log holds
    ``done_marker`` (its result was printed; the exit code is from tearing down)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_tagged(bed.tag)
        tails = "\n".join(f"--- {l}\n{l.read_text()[-2000:]}" for l in logs)
        raise RuntimeError(f"{what}: ran past {timeout:.0f} s\n{tails}") from None
    for p, log in zip(procs, logs):
        if p.returncode != 0 and not (done_marker and done_marker in log.read_text()):
            kill_tagged(bed.tag)
            raise RuntimeError(f"{what}: exit {p.returncode}\n{log.read_text()[-3000:]}")


def run_distqat(bed: Testbed, overrides: Sequence[str], timeout: float) -> dict:
    """One job, one worker per host, through launch/host.sh; its summary.json."""
    job = uuid.uuid4().hex[:10]
    port = next(_PORTS)
    head = bed.hosts[0]
    procs, logs = [], []
    for h in bed.hosts:
        for old in h.cwd.glob("runs"):
            shutil.rmtree(old)
        log = h.cwd / f"{job}.log"
        # its own PID namespace too: TensorPipe's CMA channel (process_vm_readv) would
        # otherwise carry RPC tensors between the "hosts" of one machine, past the link
        cmd = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
               'hostname "$0" && exec "$@"', h.name,
               str(ROOT / "launch" / "host.sh"), "--rdzv-endpoint", f"{head.addr}:{port}",
               "--nnodes", str(bed.n), "--nproc-per-node", "1", "--rdzv-id", job,
               "--max-restarts", "0", "--config", str(CONFIG), *overrides,
               f"comm.interface={h.ns}"]
        procs.append(bed.popen(h, cmd, log))
        logs.append(log)
    _wait_all(bed, procs, timeout, f"distqat {' '.join(overrides)}", logs)
    summary = None
    scalars: Dict[str, Dict[str, List[float]]] = {}
    for h in bed.hosts:
        run = h.cwd / "runs" / "simcheck"
        if (run / "summary.json").exists():
            summary = json.loads((run / "summary.json").read_text())
        for folder in list(run.glob("replica*")) + list(run.glob("stage*-replica*")):
            scalars[folder.name] = _scalars(folder)
    if summary is None:
        raise RuntimeError(f"distqat {' '.join(overrides)}: no summary.json on any host")
    if summary.get("exit_reason") != "completed":
        raise RuntimeError(f"distqat {' '.join(overrides)}: {summary.get('exit_reason')}")
    summary["scalars"] = scalars
    return summary


def _scalars(folder: Path) -> Dict[str, List[float]]:
    """The TensorBoard scalars of one run folder, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_ddp(bed: Testbed, overrides: Sequence[str], steps: int, timeout: float) -> List[dict]:
    """``bench/peers.py``'s DDP replica on every host (gloo on the veth); per rank."""
    master = f"{bed.hosts[0].addr}:{next(_PORTS)}"
    procs, logs = [], []
    for r, h in enumerate(bed.hosts):
        log = h.cwd / f"ddp-{uuid.uuid4().hex[:6]}.log"
        env_cmd = ["env", f"GLOO_SOCKET_IFNAME={h.ns}", sys.executable, "-c", DDP_WORKER,
                   str(r), str(bed.n), master, str(steps), str(ROOT), *overrides]
        procs.append(bed.popen(h, env_cmd, log))
        logs.append(log)
    # gloo's teardown after the result sometimes aborts (exit -6, "terminate called
    # without an active exception", once in 108 runs): the measurement is complete
    _wait_all(bed, procs, timeout, f"ddp {' '.join(overrides)}", logs, done_marker="RESULT ")
    return [json.loads(next(l for l in log.read_text().splitlines()
                            if l.startswith("RESULT "))[7:]) for log in logs]


def measure_link(bed: Testbed, nbytes: int) -> Dict[str, float]:
    """A TCP stream host 0 -> host 1 (Mbit/s of payload) and the round trip (ms)."""
    server = (r"import socket,sys,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
              r"socket.SO_REUSEADDR,1);s.bind((sys.argv[1],5599));s.listen(1);c,_=s.accept()"
              "\nfor _ in range(50): c.sendall(c.recv(1))\n"
              r"n=int(sys.argv[2]);got=0;t0=None"
              "\nwhile got<n:\n b=c.recv(1<<20)\n if not b: break\n"
              " if t0 is None: t0=time.perf_counter()\n got+=len(b)\n"
              r"print(got*8/(time.perf_counter()-t0)/1e6);c.sendall(b'x')")
    client = (r"import socket,sys,time;c=socket.create_connection((sys.argv[1],5599));"
              r"c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1);rtt=[]"
              "\nfor _ in range(50):\n t=time.perf_counter();c.sendall(b'x');c.recv(1)"
              "\n rtt.append(time.perf_counter()-t)\n"
              r"rtt.sort();print(rtt[len(rtt)//2]*1e3);n=int(sys.argv[2]);b=bytes(1<<20);s=0"
              "\nwhile s<n:\n k=min(len(b),n-s);c.sendall(b[:k]);s+=k\nc.recv(1)")
    a, b = bed.hosts[0], bed.hosts[1]
    srv = bed.popen(b, [sys.executable, "-c", server, b.addr, str(nbytes)], b.cwd / "srv.log")
    time.sleep(1.0)
    cli = bed.popen(a, [sys.executable, "-c", client, b.addr, str(nbytes)], a.cwd / "cli.log")
    _wait_all(bed, [cli, srv], 120, "link measurement", [a.cwd / "cli.log", b.cwd / "srv.log"])
    return {"mbit_s": float((b.cwd / "srv.log").read_text().split()[-1]),
            "rtt_ms": float((a.cwd / "cli.log").read_text().split()[-1])}


# ---------------------------------------------------------------- predictions

def computing_at_once(cfg, hosts: int) -> int:
    """How many workers of a run on ``hosts`` compute at the same time, so the processes a
    profile runs at once (the testbed's hosts share this machine's cores): every replica,
    and of a replica's stages at most one per micro-batch in flight, min(stages,
    micro-batches) (3 stages, 2 micro-batches: 2)."""
    mp = cfg.model_pipeline
    return max(1, hosts // mp.num_stages) * min(mp.num_stages, mp.num_microbatches)


def stage_costs(overrides: Sequence[str], workdir: Path, *, hosts: int,
                concurrent: Optional[int] = None, repeats: int = 5, fresh: bool = False,
                calibrate: bool = True):
    """The config, the model's facts and stage times profiled here by ``concurrent``
    processes at once (by default as many as compute at once in a run on ``hosts``:
    :func:`computing_at_once`), and (``calibrate``) scaled to a short real run of as many
    pipelines as the hosts hold (``simulate --calibrate``), kept per config shape under
    ``workdir`` (``fresh``: measure again)."""
    from distqat import simulate as sim
    from distqat import stage_times as st
    from distqat.config import load_config
    from distqat.fileio import write_json
    from distqat.stage_profile import profile
    from distqat.step_calibration import needs_calibration, with_calibration

    shape = "-".join(o.split("=")[1] for o in overrides if o.startswith(
        ("model_pipeline.num_stages", "model_pipeline.num_microbatches",
         "diloco.batch_size_per_step", "model_pipeline.model_args")))
    where = workdir / shape
    where.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(where)
    try:
        cfg = load_config(CONFIG, list(overrides))
        io = sim.model_io(cfg, [])
        facts = st.model_facts(cfg, io)
        key = st.profile_key(cfg, io, facts)
        times = None if fresh else st.load_profile(cfg, key)
        if times is None:
            times = profile(cfg, io, facts, repeats=repeats, key=key,
                            concurrent=concurrent or computing_at_once(cfg, hosts))
        replicas = max(1, hosts // cfg.model_pipeline.num_stages)
        if calibrate and needs_calibration(cfg, times, replicas):
            times = with_calibration(cfg, facts, times, replicas)
            write_json(cfg.run_path / st.PROFILE_FILE, times, durable=False)
    finally:
        os.chdir(cwd)
    return cfg, facts, times


def prediction(overrides: Sequence[str], hosts: int, rate: float, latency: float,
               workdir: Path, repeats: int = 5, fresh: bool = False,
               calibrate: bool = True) -> dict:
    """``distqat.simulate``'s figures for this setup on ``hosts`` namespace hosts."""
    cfg, facts, times = stage_costs(overrides, workdir, hosts=hosts, repeats=repeats,
                                    fresh=fresh, calibrate=calibrate)
    return predict_with(cfg, facts, times, hosts, rate, latency)


def predict_with(cfg, facts, times: dict, hosts: int, rate: float, latency: float) -> dict:
    from distqat import plan_cost as pc
    from distqat import simulate as sim

    w = sim.workload(cfg, facts, times)
    fleet = pc.Fleet(hosts, pc.Link(rate, latency))
    diloco = pc.predict(w, fleet).__dict__
    return {"diloco": diloco, "ddp": pc.predict_ddp(w, fleet).__dict__, "times": times,
            "straggle_s": pc.straggle_s(w, diloco["replicas"], w.inner_steps)}


def repredict(result: dict) -> dict:
    """``result`` with every run's prediction recomputed by the current model."""
    from distqat import simulate as sim
    from distqat import stage_times as st
    from distqat.config import load_config

    for row in result["runs"]:
        n, rate = row["hosts"], row["rate"]
        cfg = load_config(CONFIG, setup_overrides(row["setup"], n) + result.get("set", []))
        facts = st.model_facts(cfg, sim.model_io(cfg, []))
        latency = result["links"][f"{n}/{rate:g}"]["rtt_ms"] / 2e3
        row["predicted"] = predict_with(cfg, facts, row["predicted"]["times"], n, rate,
                                        latency)
    result["command"] += " (predictions recomputed by --repredict)"
    return result


def profile_concurrency(hosts: Sequence[int], rates: Sequence[float], setups: Sequence[str],
                        concurrency: Sequence[int], repeats: int, profile_repeats: int,
                        workdir: Path) -> None:
    """Each setup's prediction from fresh profiles by K processes at once (no testbed:
    the links' latency is taken as 0)."""
    for n, name, rep, k in itertools.product(hosts, setups, range(repeats), concurrency):
        cfg, facts, times = stage_costs(setup_overrides(name, n), workdir / f"{n}-{k}",
                                        hosts=n, concurrent=k, repeats=profile_repeats,
                                        fresh=True, calibrate=False)
        stages = ", ".join(f"{1e3 * s['fwd_s']:.2f}/{1e3 * s['bwd_s']:.2f}"
                           f" (sd {1e3 * s.get('sd_s', 0.0):.2f})" for s in times["stages"])
        for rate in rates:
            d = predict_with(cfg, facts, times, n, rate, 0.0)["diloco"]
            print(f"{n} hosts, {name}, {rate / 1e6:g} Mbit/s, profiled by {k} at once "
                  f"(run {rep + 1}): inner step {1e3 * d['inner_s']:.1f} ms, outer step "
                  f"{d['outer_s']:.3f} s; stages fwd/bwd ms {stages}; RPC message "
                  f"{1e3 * times['rpc_s']:.2f} ms", flush=True)


def setup_overrides(name: str, hosts: int) -> List[str]:
    stages = hosts if name == "pipe" else 1
    micro = [] if name == "pipe" else ["model_pipeline.num_microbatches=1"]
    return COMMON + SETUPS[name] + [f"model_pipeline.num_stages={stages}"] + micro


def tcp_counters(bed: Testbed) -> Dict[str, int]:
    """TCP segments sent and retransmitted so far, summed over the hosts' namespaces."""
    total = {"out_segs": 0, "retrans_segs": 0}
    for h in bed.hosts:
        lines = [l.split() for l in _ip("netns", "exec", h.ns, "cat", "/proc/net/snmp").stdout
                 .splitlines() if l.startswith("Tcp:")]
        row = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:])))
        total["out_segs"] += row["OutSegs"]
        total["retrans_segs"] += row["RetransSegs"]
    return total


def measure(bed: Testbed, name: str, overrides: List[str], pred: dict, seconds: float,
            timeout: float) -> dict:
    """One run of ``name``, sized to train about ``seconds``; the measured figures, with
    the TCP segments the hosts sent and retransmitted meanwhile (the shaper's drops)."""
    before = tcp_counters(bed)
    out = _measure_run(bed, name, overrides, pred, seconds, timeout)
    after = tcp_counters(bed)
    out.update({k: after[k] - before[k] for k in after})
    return out


def _measure_run(bed: Testbed, name: str, overrides: List[str], pred: dict, seconds: float,
                 timeout: float) -> dict:
    if name == "ddp":
        step = pred["ddp"]["step_s"]
        steps = int(min(400, max(5, seconds / step)))
        ranks = run_ddp(bed, overrides, steps, timeout)
        per_step = max(r["seconds"] for r in ranks) / steps
        return {"steps": steps, "s_per_step": per_step,
                "samples_per_s": sum(r["samples"] / r["seconds"] for r in ranks)}
    outer = pred["diloco"]["outer_s"]
    n = int(min(200, max(4, seconds / outer)))
    s = run_distqat(bed, overrides + [f"diloco.outer_steps={n}"], timeout)
    per_outer = statistics.median(r["train_seconds"] / r["outer_steps_done"]
                                  for r in s["replicas"])
    # the split, from the run's own scalars: a replica's inner steps are its training time
    # less its outer-step waits; a stage host's outer step (DiLoCo's collectives and local
    # work) is the least over replicas of its median (the last to arrive waits least)
    inner = statistics.median(
        (r["train_seconds"] - sum(s["scalars"][f"replica{r['replica']}"]["outer/wait_s"]))
        / r["inner_steps_done"] for r in s["replicas"])
    sync = min(statistics.median(v["outer/step_s"]) for k, v in s["scalars"].items()
               if k.startswith("stage0-"))
    return {"outer_steps": n, "s_per_outer": per_outer, "samples_per_s": s["samples_per_s"],
            "inner_s": inner, "sync_s": sync, **step_spread(s["scalars"], overrides)}


def step_spread(scalars: Dict[str, Dict[str, List[float]]], overrides: Sequence[str]) -> dict:
    """With ``--set log_every=1`` (every step's time in the scalars): a step's standard
    deviation (median over replicas) and how long the replicas' mean waits for the slowest
    per outer step (max less mean of their windows' sums, averaged), past the first window;
    and a step's mean over its median (medians over replicas): the tail a profile's median
    misses. Else nothing."""
    H = int([o for o in overrides if o.startswith("diloco.inner_steps=")][-1].split("=")[1])
    steps = {k: [b / r for b, r in zip(v["train/batch_size"], v["train/samples_per_s"])][H:]
             for k, v in scalars.items() if k.startswith("replica")
             and len(v.get("train/samples_per_s", [])) > 2 * H}
    if len(steps) < 2:
        return {}
    windows = zip(*([sum(t[i:i + H]) for i in range(0, len(t) - H + 1, H)]
                    for t in steps.values()))
    return {"step_sd_s": statistics.median(statistics.stdev(t) for t in steps.values()),
            "straggle_s": statistics.mean(max(w) - statistics.mean(w) for w in windows),
            "step_mean_s": statistics.median(statistics.fmean(t) for t in steps.values()),
            "step_median_s": statistics.median(statistics.median(t) for t in steps.values())}


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


INTERNET = {"distilgpt2": ROOT / "configs" / "distilgpt2.yaml",
            "gptneo": ROOT / "configs" / "gptneo.yaml"}
# every host holds the whole model (one stage), as INTELLECT-1's nodes did; int8, H = 100
INTERNET_COMMON = ["model_pipeline.num_stages=1", "model_pipeline.num_microbatches=1",
                   "diloco.inner_steps=100", "quant.wire.pseudo_grads=int8",
                   "comm.threads_per_worker=2"]


def part_internet(hosts: Sequence[int], rate: float, latency: float, device: str, mfu: float,
                  big_batch: int, workdir: Path) -> str:
    """Predictions only (no namespaces): DiLoCo against DDP at internet scale, compute from
    this CPU (profiled, the configs' batch) and from ``device``'s FLOPs at ``mfu`` of peak
    (the configs' batch, and ``big_batch`` sequences per replica per inner step)."""
    from distqat import plan_cost as pc
    from distqat import simulate as sim
    from distqat import stage_times as st
    from distqat.config import load_config
    from distqat.stage_profile import profile

    lines = [f"{rate / 1e6:g} Mbit/s per host, {latency * 1e3:g} ms one way; inner_steps 100; "
             "one stage (the whole model on each host's device); utilisation % (seconds per "
             "outer step)", "",
             "| model | compute | batch / replica | hosts | DiLoCo int8 (distqat: all-gather) | "
             "DiLoCo int8, ring all-reduce (not built) | DiLoCo fp32 | DDP fp32 (per 100 steps) "
             "| DiLoCo int8 / DDP samples/s |", "|---|---|---|---|---|---|---|---|---|"]
    sent: Dict[tuple, List[float]] = {}  # (model, hosts) -> bytes one host sends per window
    for model, path in INTERNET.items():
        for source in ("cpu", device, f"{device}-big"):
            batch = big_batch if source.endswith("-big") else None
            over = INTERNET_COMMON + ([f"diloco.batch_size_per_step={batch}"] if batch else [])
            where = workdir / model
            where.mkdir(parents=True, exist_ok=True)
            cwd = os.getcwd()
            os.chdir(where)
            try:
                cfg = load_config(path, over)
                io = sim.model_io(cfg, [])
                facts = st.model_facts(cfg, io)
                if source == "cpu":
                    key = st.profile_key(cfg, io, facts)
                    times = st.load_profile(cfg, key) or profile(cfg, io, facts, repeats=2,
                                                                 key=key)
                    what = f"this CPU, {times['threads']} threads (profiled)"
                else:
                    peak, membw = st.DEVICES[device]
                    times = st.device_times(facts, cfg.diloco.batch_size_per_step, peak * mfu,
                                            membw)
                    what = f"{device} at {mfu:.0%} of peak"
            finally:
                os.chdir(cwd)
            for n in hosts:
                fleet = pc.Fleet(n, pc.Link(rate, latency))
                cells = []
                for wire, ring in (("int8", False), ("int8", True), ("fp32", False)):
                    cfg.quant.wire.pseudo_grads = wire
                    p = pc.predict(sim.workload(cfg, facts, times, pseudo_allreduce=ring), fleet)
                    cells.append(f"{100 * p.utilisation:.1f} ({p.outer_s:.4g} s)")
                    sent.setdefault((model, n), []).append(p.pseudo_grad_bytes)
                    if wire == "int8" and not ring:
                        dl = p
                cfg.quant.wire.pseudo_grads = "int8"
                d = pc.predict_ddp(sim.workload(cfg, facts, times), fleet)
                sent[(model, n)].append(d.gradient_bytes)
                cells.append(f"{100 * d.utilisation:.2f} ({d.outer_s:.4g} s)")
                lines.append(f"| {model} | {what} | {cfg.diloco.batch_size_per_step} | {n} | "
                             + " | ".join(cells) + f" | {dl.samples_per_s / d.samples_per_s:.3g} |")
    lines += ["", "Bytes one host sends per 100 inner steps (GB), and DDP's / DiLoCo's:", "",
              "| model | hosts | DDP fp32 | DiLoCo fp32 | DiLoCo int8 (distqat: all-gather) | "
              "DiLoCo int8, ring all-reduce (not built) |", "|---|---|---|---|---|---|"]
    for (model, n), v in sent.items():
        int8, ring, fp32, ddp = v[:4]  # the first compute source's; bytes do not depend on it
        lines.append(f"| {model} | {n} | {ddp / 1e9:.3g} | {fp32 / 1e9:.3g} ({ddp / fp32:.0f}x) "
                     f"| {int8 / 1e9:.3g} ({ddp / int8:.3g}x) | {ring / 1e9:.3g} "
                     f"({ddp / ring:.0f}x) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rates", nargs="+", default=["10mbit", "100mbit", "1gbit"])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=12.0, help="training seconds per run")
    ap.add_argument("--profile-repeats", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--queue-floor", type=int, default=0,
                    help="bytes the tbf queue holds at least (default: 10 ms of the rate)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every distqat job and its prediction")
    ap.add_argument("--repredict", type=Path, metavar="SAVED.json",
                    help="recompute a saved check's predictions with the current model")
    ap.add_argument("--profile-concurrency", type=int, nargs="+", metavar="K",
                    help="only profile, by K processes at once, and print the predictions")
    ap.add_argument("--part", choices=["namespaces", "internet"], default="namespaces")
    ap.add_argument("--device", default="h100", help="--part internet: the GPU of the table")
    ap.add_argument("--mfu", type=float, default=0.4, help="--part internet: share of peak")
    ap.add_argument("--big-batch", type=int, default=8192,
                    help="--part internet: sequences per replica per inner step, large")
    a = ap.parse_args(argv)
    if a.repredict:
        result = repredict(json.loads(a.repredict.read_text()))
        print(table(result))
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        return 0
    if a.profile_concurrency:
        from distqat.simulate import parse_bandwidth
        with tempfile.TemporaryDirectory(prefix="dqs") as tmp:
            profile_concurrency(a.hosts, [parse_bandwidth(r)[0] for r in a.rates], a.setups,
                                a.profile_concurrency, a.repeats, a.profile_repeats,
                                Path(tmp))
        return 0
    if a.part == "internet":
        with tempfile.TemporaryDirectory(prefix="dqs") as tmp:
            print(part_internet([8, 64, 512], 100e6, 0.05, a.device, a.mfu, a.big_batch,
                                Path(os.environ.get("DQS_PROFILES", tmp))))
        return 0
    why = unavailable()
    if why:
        print(f"bench/simulate_check.py: cannot run: {why}", file=sys.stderr)
        return 2
    from distqat.simulate import parse_bandwidth
    rates = [parse_bandwidth(r)[0] for r in a.rates]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    result: dict = {"command": "python bench/simulate_check.py " + " ".join(argv or sys.argv[1:]),
                    "runs": [], "links": {}, "set": a.set}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dqs") as tmp:
        profiles = Path(tmp) / "profiles"
        profiles.mkdir()
        for n in a.hosts:
            with Testbed(n, Path(tmp) / f"bed{n}") as bed:
                for rate in rates:
                    bed.throttle(rate, a.queue_floor)
                    link = measure_link(bed, int(rate / 8 * 2))  # ~2 s of data
                    result["links"][f"{n}/{rate:g}"] = link
                    print(f"# {n} hosts, {rate / 1e6:g} Mbit/s: TCP {link['mbit_s']:.1f} Mbit/s,"
                          f" round trip {link['rtt_ms']:.3f} ms", flush=True)
                    latency = link["rtt_ms"] / 2e3
                    for repeat in range(a.repeats):
                        order = a.setups if repeat % 2 == 0 else a.setups[::-1]
                        measured_now = set()  # each config shape profiled again per round
                        for name in order:
                            over = setup_overrides(name, n) + a.set
                            shape = name == "pipe"
                            # DDP's prediction takes no stage times: its shape is
                            # calibrated by the DiLoCo setup that shares it
                            pred = prediction(over, n, rate, latency, profiles,
                                              a.profile_repeats, fresh=shape not in measured_now,
                                              calibrate=name != "ddp")
                            measured_now.add(shape)
                            t0 = time.perf_counter()
                            meas = measure(bed, name, over, pred, a.seconds, a.timeout)
                            row = {"hosts": n, "rate": rate, "setup": name, "repeat": repeat,
                                   "predicted": pred, "measured": meas,
                                   "wall_s": time.perf_counter() - t0}
                            result["runs"].append(row)
                            print(json.dumps({k: row[k] for k in ("hosts", "rate", "setup")}
                                             | meas), flush=True)
                            if a.json:
                                a.json.write_text(json.dumps(result, indent=1))
    result["wall_s"] = time.perf_counter() - started
    print(table(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


def table(result: dict) -> str:
    """The markdown table: medians of the repeats (each run has its own prediction, from
    the stage times profiled in its round), predicted against measured; for DiLoCo also
    the split of an outer step into inner steps and the outer step's own work."""
    groups: Dict[tuple, List[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["hosts"], r["rate"], r["setup"]), []).append(r)
    lines = ["| hosts | link | setup | predicted s | measured s (runs) | error | predicted "
             "samples/s | measured samples/s | error | within 25 % | inner step ms, "
             "predicted / measured | outer step's own s, predicted / measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hits = 0
    med = statistics.median
    for (n, rate, name), runs in groups.items():
        key = "ddp" if name == "ddp" else "diloco"
        p_s = med(r["predicted"][key]["step_s" if key == "ddp" else "outer_s"] for r in runs)
        p_r = med(r["predicted"][key]["samples_per_s"] for r in runs)
        ms = [r["measured"]["s_per_step" if key == "ddp" else "s_per_outer"] for r in runs]
        m_s, m_r = med(ms), med(r["measured"]["samples_per_s"] for r in runs)
        ok = abs(_err(p_s, m_s)) <= 0.25 and abs(_err(p_r, m_r)) <= 0.25
        hits += ok
        split = "- | -"
        if key == "diloco":
            split = (f"{1e3 * med(r['predicted']['diloco']['inner_s'] for r in runs):.1f} / "
                     f"{1e3 * med(r['measured']['inner_s'] for r in runs):.1f} | "
                     f"{med(r['predicted']['diloco']['sync_s'] for r in runs):.3f} / "
                     f"{med(r['measured']['sync_s'] for r in runs):.3f}")
        unit = "per step" if key == "ddp" else "per outer step"
        lines.append(f"| {n} | {rate / 1e6:g} Mbit/s | {name} ({unit}) | {p_s:.3f} | {m_s:.3f} "
                     f"({', '.join(f'{v:.3f}' for v in ms)}) | {100 * _err(p_s, m_s):+.0f} % | "
                     f"{p_r:.0f} | {m_r:.0f} | {100 * _err(p_r, m_r):+.0f} % | "
                     f"{'yes' if ok else 'NO'} | {split} |")
    lines.append(f"\n{hits} of {len(groups)} predictions within 25 % of the median measurement "
                 f"({result.get('wall_s', 0):.0f} s in all).")
    spread = [(key, runs) for key, runs in groups.items()
              if all("step_sd_s" in r["measured"] for r in runs)]
    if spread:  # runs with --set log_every=1
        lines += ["", "| hosts | link | setup | a step's sd ms, profiled / measured | wait for "
                  "the slowest per outer step ms, predicted / measured | a step's median / mean "
                  "ms, measured (profiled) |", "|---|---|---|---|---|---|"]
        for (n, rate, name), runs in spread:
            sd = med(max(s.get("sd_s", 0.0) for s in r["predicted"]["times"]["stages"])
                     for r in runs)
            lines.append(
                f"| {n} | {rate / 1e6:g} Mbit/s | {name} | {1e3 * sd:.2f} / "
                f"{1e3 * med(r['measured']['step_sd_s'] for r in runs):.2f} | "
                f"{1e3 * med(r['predicted'].get('straggle_s', 0.0) for r in runs):.1f} / "
                f"{1e3 * med(r['measured']['straggle_s'] for r in runs):.1f} | "
                f"{1e3 * med(r['measured'].get('step_median_s', 0.0) for r in runs):.2f} / "
                f"{1e3 * med(r['measured'].get('step_mean_s', 0.0) for r in runs):.2f} "
                f"({1e3 * med(r['predicted']['diloco']['inner_s'] for r in runs):.2f}) |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
