"""Chaos: one long job on simulated hosts, faults injected at random moments from a seed.

    python bench/chaos.py [--faults 20] [--seed 0] [--hosts 4] [--json OUT]

The job: ``--hosts`` torchrun agents with 2 workers each (``launch/host.sh``), meeting
through ``launch/store.py`` so that any host may die, the tiny config cut into 3 stages:
with 4 hosts, 2 replicas and 2 spares. The faults, each kind in turn (order shuffled by
the seed), each at a random moment (a random number of outer steps after training
resumed, plus a random fraction of a second):

* ``driver``, ``middle``, ``last``, ``spare``: ``kill -9`` of a host holding that role;
* ``allreduce``, ``checkpoint``, ``restore``: a host dies at that point of the protocol
  (armed through :mod:`distqat.faults`, test-only); for ``restore``, another host is
  killed so that a restore happens (the first one started, while it lives: with plain
  c10d it would hold the rendezvous store), and the armed one dies in it;
* ``two``: two hosts killed at once;
* ``hang``: a host holding a stage SIGSTOPped: it stops answering without dying. Once
  the others have gone on without it, it is SIGCONTed and comes back on its own.

After each fault the lost hosts come back (fresh agents join), so every fault meets a full
fleet. Per fault it reports: seconds from the fault to training again (and the part that
``fleet.json`` calls the recovery: from the first worker noticing to the first inner step),
inner steps lost, and whether the resumed model's loss on the resumed batch equals the one
before; at the end, outer steps completed against asked, and whether every replica holds
bit-identical stages (``summary.json``'s per-replica sha256 of each stage).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))
from distqat.elastic.dist import free_port  # noqa: E402
from distqat.faults import ENV as FAULT_ENV  # noqa: E402
from localcluster import LocalCluster  # noqa: E402

KINDS = ("driver", "middle", "last", "spare", "allreduce", "checkpoint", "restore", "two",
         "hang")
INNER_STEPS = 10
STAGES = 3
WAIT_S = 180  # the longest any single wait may take before the run is declared stuck


class Stuck(RuntimeError):
    """The job did not get where it should have within :data:`WAIT_S`."""


@dataclass
class Fault:
    kind: str
    hosts: List[int]  # indices of the hosts it hit
    at: float  # time.time() of the injection
    outer_step: int  # newest checkpointed outer step then
    resumed_s: Optional[float] = None  # fault -> first inner step of the round without them
    recoveries: List[dict] = field(default_factory=list)  # fleet.json's, for this fault
    back: float = 0.0  # time.time() when the lost hosts were sent back
    rejoin_s: Optional[float] = None  # hosts back -> first inner step with the full fleet
    join_recoveries: List[dict] = field(default_factory=list)

    def row(self) -> dict:
        """The fault as the report lists it."""
        def paired(recs):  # the resumed model's loss on the resumed batch, before = after
            pairs = [r for r in recs if r.get("loss_before") is not None]
            return [abs(r["loss_after"] - r["loss_before"]) <= 1e-6 * max(1.0, abs(r["loss_before"]))
                    for r in pairs]

        return {"kind": self.kind, "hosts": self.hosts, "outer_step": self.outer_step,
                "resumed_s": self.resumed_s, "rejoin_s": self.rejoin_s,
                "recovery_s": [round(r["seconds"], 2) for r in self.recoveries],
                "causes": [r.get("cause") for r in self.recoveries],
                "steps_lost": sum(r["steps_lost"] for r in self.recoveries),
                "join_recovery_s": [round(r["seconds"], 2) for r in self.join_recoveries],
                "join_steps_lost": sum(r["steps_lost"] for r in self.join_recoveries),
                "loss_equal": paired(self.recoveries + self.join_recoveries)}


class Chaos:
    """One job on simulated hosts, and the faults done to it."""

    def __init__(self, workdir: Path, *, hosts: int = 4, outer_steps: int, seed: int = 0,
                 env: Optional[Dict[str, str]] = None, extra: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.rng = random.Random(seed)
        self.size = hosts
        self.outer_steps = outer_steps
        self.fault_file = self.workdir / "fault.json"
        port = free_port()
        self.store = subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "store.py"), "--port", str(port), "--host",
             "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env=env)
        if "listening" not in (self.store.stdout.readline() or ""):
            raise RuntimeError("launch/store.py did not start")
        self.cluster = LocalCluster(
            self.workdir, f"127.0.0.1:{port}", job_id=f"chaos-{uuid.uuid4().hex[:8]}",
            nnodes=f"2:{hosts}", nproc_per_node=2,
            env={**(os.environ if env is None else env), FAULT_ENV: str(self.fault_file)},
            args=["--external-store", f"model_pipeline.num_stages={STAGES}",
                  f"diloco.inner_steps={INNER_STEPS}", f"diloco.outer_steps={outer_steps}",
                  "eval_every=0", "log_every=1000", *extra])
        self.run = self.workdir / "runs" / "tiny"
        self.faults: List[Fault] = []

    # ------------------------------------------------------------------ observing

    def fleet(self) -> dict:
        try:
            return json.loads((self.run / "fleet.json").read_text())
        except (OSError, ValueError):
            return {"rounds": [], "recoveries": []}

    def _check_alive(self) -> None:
        if self.store.poll() is not None:
            raise Stuck("the rendezvous store died")

    def wait_training(self, world_size: int, since: float) -> float:
        """Wait for a round of ``world_size`` started after ``since`` to take its first
        inner step (its recovery recorded); returns when that was seen."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self._check_alive()
            fleet = self.fleet()
            rounds = fleet["rounds"]
            if rounds and rounds[-1]["started"] > since and \
                    rounds[-1]["world_size"] == world_size and \
                    len(fleet["recoveries"]) == len(rounds) - 1:
                return time.time()
            if self.finished():
                raise Stuck(f"the job ended while waiting for a round of {world_size}")
            time.sleep(0.1)
        raise Stuck(f"no round of {world_size} workers trained within {WAIT_S} s:\n"
                    f"{self.cluster.log_tails()}")

    def wait_outer_step(self, step: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.cluster.outer_step_reached() < step:
            self._check_alive()
            if time.monotonic() > deadline or self.finished():
                raise Stuck(f"outer step {step} not reached:\n{self.cluster.log_tails()}")
            time.sleep(0.05)

    def finished(self) -> bool:
        return (self.run / "summary.json").exists() and not self.cluster.alive()

    def roles(self) -> Dict[int, set]:
        """Live host index -> the roles its workers play in the current round."""
        roles = self.fleet()["rounds"][-1]["roles"]
        found: Dict[int, set] = {}
        for i, host in enumerate(self.cluster.hosts):
            if host.poll() is not None:
                continue
            found[i] = set()
            for proc in psutil.Process(host.pid).children(recursive=True):
                try:
                    rank = proc.environ().get("RANK")
                except psutil.Error:
                    continue
                if rank is None or int(rank) >= len(roles):
                    continue
                role = roles[int(rank)]
                found[i].add("spare" if role is None else
                             "driver" if role[0] == 0 else
                             "last" if role[0] == STAGES - 1 else "middle")
        return found

    # ------------------------------------------------------------------ acting

    def start(self) -> None:
        started = time.time()
        for _ in range(self.size):
            self.cluster.add_host()
        self.wait_training(2 * self.size, started - 1)

    def _pick(self, kind: str, roles: Dict[int, set]) -> List[int]:
        live = sorted(roles)
        holding = [i for i in live if roles[i] - {"spare"}]
        if kind in ("driver", "middle", "last"):
            having = [i for i in live if kind in roles[i]]
            alone = [i for i in having if "driver" not in roles[i]] if kind != "driver" else []
            return [self.rng.choice(alone or having)]
        if kind == "spare":
            only = [i for i in live if roles[i] == {"spare"}]
            return [self.rng.choice(only or [i for i in live if "spare" in roles[i]] or live)]
        if kind in ("allreduce", "checkpoint", "hang"):
            return [self.rng.choice(holding)]
        if kind == "restore" and 0 in live:  # (armed, killed): the first host is killed,
            # the one plain c10d would have hosted its store on
            return [self.rng.choice(live[1:]), 0]
        return self.rng.sample(live, 2)  # two; restore: (armed, killed)

    def _arm(self, point: str, host: int) -> None:
        text = json.dumps({"point": point, "host_pid": self.cluster.hosts[host].pid})
        tmp = self.fault_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.fault_file)

    def _wait_dead(self, hosts: List[int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for i in hosts:
            try:
                self.cluster.hosts[i].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise Stuck(f"armed host {i} did not die within {timeout} s") from None

    def inject(self, kind: str, not_before: int, come_back: bool = True) -> Fault:
        """One fault, at a random moment once outer step ``not_before`` is reached (or at
        once, past it), then its recovery, then (``come_back``) the hosts coming back."""
        reached = self.cluster.outer_step_reached()
        if reached >= self.outer_steps - 2:
            raise Stuck(f"the job is at outer step {reached} of {self.outer_steps} before "
                        f"its last fault: ask for more outer steps")
        self.wait_outer_step(max(not_before, reached + 1) + self.rng.randint(0, 3))
        time.sleep(self.rng.uniform(0, 0.5))
        roles = self.roles()
        hosts = self._pick(kind, roles)
        fault = Fault(kind, hosts, time.time(), self.cluster.outer_step_reached())
        self.faults.append(fault)
        gone = list(hosts)
        if kind in ("driver", "middle", "last", "spare", "two"):
            for i in hosts:
                self.cluster.kill_host(self.cluster.hosts[i])
        elif kind in ("allreduce", "checkpoint"):
            self._arm(kind, hosts[0])
            self._wait_dead(hosts)
        elif kind == "restore":
            armed, killed = hosts
            self._arm("restore", armed)
            self.cluster.kill_host(self.cluster.hosts[killed])
            self._wait_dead([armed])
        else:  # hang
            self._signal(hosts[0], signal.SIGSTOP)
        self.fault_file.unlink(missing_ok=True)
        resumed = self.wait_training(2 * (self.size - len(gone)), fault.at)
        fault.resumed_s = resumed - fault.at
        fault.back = back = time.time()
        if kind == "hang":
            self._signal(gone[0], signal.SIGCONT)  # it finds its round gone and rejoins
        elif not come_back:
            self.size -= len(gone)
            return fault
        else:
            for _ in gone:
                self.cluster.add_host()
        fault.rejoin_s = self.wait_training(2 * self.size, back) - back
        return fault

    def attribute(self) -> None:
        """Give each fault the recoveries ``fleet.json`` recorded for it and for its hosts
        coming back (read at the end: a recovery's losses are paired a few outer steps
        after it)."""
        recoveries = [r for r in self.fleet()["recoveries"] if r.get("noticed_at")]
        ends = [f.at for f in self.faults[1:]] + [float("inf")]
        for fault, end in zip(self.faults, ends):
            fault.recoveries = [r for r in recoveries if fault.at <= r["noticed_at"] < fault.back]
            fault.join_recoveries = [r for r in recoveries if fault.back <= r["noticed_at"] < end]

    def _signal(self, host: int, sig: int) -> None:
        root = psutil.Process(self.cluster.hosts[host].pid)
        for proc in [root] + root.children(recursive=True):
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def finish(self) -> dict:
        """Wait for the job to end; its summary."""
        if not self.cluster.wait(timeout=WAIT_S * 3):
            raise Stuck(f"the job did not end:\n{self.cluster.log_tails()}")
        return json.loads((self.run / "summary.json").read_text())

    def close(self) -> None:
        self.cluster.close()
        if self.store.poll() is None:
            self.store.kill()
            self.store.wait(10)


def schedule(faults: int, seed: int) -> List[str]:
    """``faults`` kinds: every kind in turn, each pass in an order drawn from ``seed``."""
    rng = random.Random(seed)
    kinds: List[str] = []
    while len(kinds) < faults:
        batch = list(KINDS)
        rng.shuffle(batch)
        kinds += batch
    return kinds[:faults]


def run(workdir: Path, kinds: Sequence[str], *, seed: int = 0, hosts: int = 4,
        every: int = 80, last_comes_back: bool = True, stop_after: bool = False,
        env: Optional[Dict[str, str]] = None, extra: Sequence[str] = (),
        log=lambda msg: None) -> dict:
    """The whole chaos run; a report (see :func:`report`). Fault i comes once outer step
    ``i * every`` is reached, and the job asks for ``every`` more after the last: the job
    goes on while lost hosts come back, and a job that ended before its last fault would
    prove nothing, so ``every`` must exceed what one fault and its return take.
    ``last_comes_back=False``: the job ends on the fleet the last fault left.
    ``stop_after``: the job asks for far more outer steps, and is stopped (``distqat.status
    --stop``) after the last fault; the report's ``outer_steps_asked`` is then the outer
    step reached when the stop was asked for (the job must complete at least that).
    ``extra``: more config overrides for every host."""
    outer_steps = every * (len(kinds) + 1) * (100 if stop_after else 1)
    chaos = Chaos(workdir, hosts=hosts, outer_steps=outer_steps, seed=seed, env=env,
                  extra=extra)
    started = time.time()
    try:
        chaos.start()
        for i, kind in enumerate(kinds, 1):
            fault = chaos.inject(kind, not_before=i * every,
                                 come_back=last_comes_back or i < len(kinds))
            log(f"fault {i}/{len(kinds)} {kind} (hosts {fault.hosts}, outer step "
                f"{fault.outer_step}): training again {fault.resumed_s:.1f} s later; "
                f"back in {fault.rejoin_s} s")
        asked = outer_steps
        if stop_after:
            from distqat.elastic.control import STOP, request

            asked = chaos.cluster.outer_step_reached()
            request(chaos.run, STOP)
        summary = chaos.finish()
        chaos.attribute()
    finally:
        chaos.close()
    return report(chaos.faults, summary, asked, time.time() - started)


def report(faults: List[Fault], summary: dict, asked: int, seconds: float) -> dict:
    digests = [r.get("stage_digests") for r in summary["replicas"]]
    return {
        "faults": [f.row() for f in faults],
        "exit_reason": summary["exit_reason"],
        "outer_steps_asked": asked,
        "outer_steps_done": summary["outer_steps_done"],
        "replicas": len(digests),
        "replicas_identical": bool(digests) and all(d == digests[0] and d for d in digests),
        "seconds": round(seconds, 1),
    }


def markdown(result: dict, command: str) -> str:
    rows = ["| # | fault | hosts | at outer step | training again after (s) | recovery s "
            "(fleet.json) | inner steps lost | host(s) back: training after (s) | recovery s "
            "| inner steps lost | loss before = after |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, f in enumerate(result["faults"], 1):
        def secs(values):
            return ", ".join(f"{v:.1f}" for v in values) or "-"
        equal = f"{sum(f['loss_equal'])} of {len(f['loss_equal'])}" if f["loss_equal"] else "-"
        rows.append(f"| {i} | {f['kind']} | {f['hosts']} | {f['outer_step']} "
                    f"| {f['resumed_s']:.1f} | {secs(f['recovery_s'])} | {f['steps_lost']} "
                    f"| {secs([f['rejoin_s']] if f['rejoin_s'] is not None else [])} "
                    f"| {secs(f['join_recovery_s'])} "
                    f"| {f['join_steps_lost']} | {equal} |")
    faults = result["faults"]
    again = [f["resumed_s"] for f in faults]
    recs = [s for f in faults for s in f["recovery_s"]]
    joins = [s for f in faults for s in f["join_recovery_s"]]
    equal = [e for f in faults for e in f["loss_equal"]]
    lines = [f"Command: `{command}`", "", *rows, "",
             f"- training again after a fault: median {statistics.median(again):.1f} s, "
             f"worst {max(again):.1f} s",
             f"- recoveries (fleet.json: first worker noticing -> first inner step): faults "
             f"median {statistics.median(recs):.1f} s over {len(recs)}; hosts coming back "
             f"median {statistics.median(joins):.1f} s over {len(joins)}" if recs and joins else
             "- recoveries: none recorded",
             f"- loss of the resumed model on the resumed batch equal before and after: "
             f"{sum(equal)} of {len(equal)} paired recoveries",
             f"- outer steps completed {result['outer_steps_done']} of "
             f"{result['outer_steps_asked']} asked ({result['exit_reason']}); "
             f"{result['replicas']} replicas, stages bit-identical: "
             f"{result['replicas_identical']}; {result['seconds']:.0f} s in all"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--kinds", default=None,
                        help=f"comma-separated kinds, in this order (of {', '.join(KINDS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--every", type=int, default=80,
                        help="outer steps between faults (the job asks for this many more)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    kinds = args.kinds.split(",") if args.kinds else schedule(args.faults, args.seed)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; expected some of {list(KINDS)}")
    workdir = Path(tempfile.mkdtemp(prefix="distqat-chaos-"))
    print(f"chaos in {workdir}: {kinds}", file=sys.stderr, flush=True)
    result = run(workdir, kinds, seed=args.seed, hosts=args.hosts,
                 every=args.every,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result, f"python bench/chaos.py {' '.join(sys.argv[1:])}".strip()))


if __name__ == "__main__":
    main()
