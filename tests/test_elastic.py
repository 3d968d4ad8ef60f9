"""Elastic training with real torchrun agents on 127.0.0.1: a host killed mid-run, a host
added mid-run, and the same kill on etcd-v2 with a real etcd. Every agent and worker is
tagged, ended by PID at teardown, and every wait is bounded."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from distqat.config import load_config
from distqat.data import make_task
from distqat.elastic.control import STOP, request
from distqat.elastic import dist as dq_dist
from distqat.elastic.dist import free_port
from localcluster import LocalCluster  # launch/, put on sys.path by conftest

from conftest import ROOT, Launcher
from test_tensorboard import check_counters_never_go_back, check_steps_are_inner_steps, load

INNER_STEPS = 10
# rendezvous rounds take ~7 s here (RECIPES.md); a recovery is that plus start-up. The
# bound is loose for a loaded 2-core CI machine; BENCHMARKS.md has the measured figures.
RECOVERY_BOUND_S = 60


class Agents(LocalCluster):
    """The cluster of a test: tagged so that teardown ends every process by PID."""

    def __init__(self, launcher: Launcher, endpoint: str, backend: str = "c10d",
                 nnodes: str = "2:3", extra=(), nproc_per_node: int = 2):
        super().__init__(launcher.cwd, endpoint, job_id=f"job-{launcher.tag[:8]}",
                         backend=backend, nnodes=nnodes, args=extra, env=launcher.env(),
                         nproc_per_node=nproc_per_node)
        self.launcher = launcher

    def start(self) -> subprocess.Popen:
        proc = self.add_host()
        self.launcher.procs.append(proc)
        return proc

    def start_store_host(self) -> subprocess.Popen:
        """The first agent, once it hosts the c10d store (it binds the endpoint)."""
        proc = self.add_store_host()
        self.launcher.procs.append(proc)
        return proc

    def wait_all(self, procs, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"an agent ran past {timeout} s:\n{self.log_tails()}")


def _wait_for_outer_step(agents: Agents, step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = agents.outer_step_reached()
        if reached >= step:
            return reached
        for proc in agents.hosts:
            assert proc.poll() is None, f"an agent exited early:\n{agents.log_tails()}"
        time.sleep(0.5)
    pytest.fail(f"training did not reach outer step {step} in {timeout} s:\n{agents.log_tails()}")


def _check_recovered(launcher: Launcher, killed_at_step: int, outer_steps: int) -> dict:
    summary = launcher.summary()
    assert summary["exit_reason"] == "completed", summary
    assert summary["outer_steps_done"] == outer_steps
    assert summary["restarts"] == 1, summary["rounds"]
    (rec,) = summary["recoveries"]
    assert rec["seconds"] < RECOVERY_BOUND_S, rec
    assert rec["steps_lost"] <= INNER_STEPS, rec
    # resumed from the last outer step (or the one being written), not from the start
    assert rec["resumed_from_outer_step"] >= killed_at_step - 1, rec
    first = summary["loss_first"]
    assert rec["loss_after"] is not None and rec["loss_after"] < 0.7 * first, rec
    # the same model (restored from a peer's checkpoint) on the same batch as before; a
    # kill right at an outer step leaves no survivor that had computed the "before"
    if rec["steps_lost"] == 0:
        return summary
    assert rec["loss_before"] is not None, rec
    assert abs(rec["loss_after"] - rec["loss_before"]) < 1e-3 * first, rec
    return summary


def _kill_and_recover(agents: Agents, victim, survivors, outer_steps: int,
                      at_step: int = 8) -> dict:
    """Kill ``victim``'s host once training reaches ``at_step``; the survivors must finish
    the job, having resumed from the last outer step."""
    reached = _wait_for_outer_step(agents, at_step)
    agents.kill_host(victim)
    agents.wait_all(survivors, timeout=240)
    assert [p.returncode for p in survivors] == [0, 0], agents.log_tails()
    return _check_recovered(agents.launcher, reached, outer_steps)


STEP_LINE = re.compile(r"replica (\d+) step (\d+) offset (\d+) loss")


def _samples_seen(run: Path) -> dict:
    """replica -> [(inner step, data offset)] in the order the rank logs of every round
    recorded them (log_every=1: every inner step)."""
    seen: dict = {}
    for log in sorted((run / "logs").glob("rank*.log")):
        for m in STEP_LINE.finditer(log.read_text()):
            seen.setdefault(int(m[1]), []).append((int(m[2]), int(m[3])))
    return seen


@pytest.mark.timeout(300)
def test_killed_host_resumes_from_last_outer_step_c10d(launcher):
    outer_steps, batch = 40, 64
    agents = Agents(launcher, f"127.0.0.1:{free_port()}",
                    extra=[f"diloco.outer_steps={outer_steps}", "eval_every=0",
                           "data.name=digits", "log_every=1"])
    agents.start_store_host()
    survivors = [agents.hosts[0], agents.start()]
    summary = _kill_and_recover(agents, agents.start(), survivors, outer_steps)
    assert [r["world_size"] for r in summary["rounds"]] == [6, 4]
    assert summary["num_replicas"] == 2
    # TensorBoard across the restore: byte counters never go back, steps are the job's
    run = launcher.cwd / "runs" / "tiny"
    check_counters_never_go_back(run)
    check_steps_are_inner_steps(run, INNER_STEPS, outer_steps)
    restarts = [e.value for e in load(run / "fleet").Scalars("fleet/restarts")]
    assert restarts == [0, 1], restarts
    # every replica that survived read, across the kill, the samples of an uninterrupted
    # run: each step's batch is the one at its data position, and only the inner steps
    # since the last outer step were read twice
    resumed = summary["recoveries"][0]["resumed_from_outer_step"] * INNER_STEPS
    task = make_task(load_config(None, ["data.name=digits"]).data)
    for replica in (0, 1):
        steps = _samples_seen(launcher.cwd / "runs" / "tiny")[replica]
        for step, offset in steps:
            assert offset == (step - 1) * batch, (replica, step, offset)
        ids = [task.sample_ids(replica, offset, batch) for _, offset in steps]
        want = [task.sample_ids(replica, (s - 1) * batch, batch)
                for s in range(1, outer_steps * INNER_STEPS + 1)]
        unique = {s: i for (s, _), i in zip(steps, ids)}
        assert [unique[s] for s in sorted(unique)] == want
        twice = [s for s in unique if [t for t, _ in steps].count(s) > 1]
        assert all(resumed < s <= resumed + INNER_STEPS for s in twice), (resumed, twice)


@pytest.mark.timeout(300)
def test_added_host_is_admitted_and_given_work(launcher):
    # far more outer steps than the test waits for: the join always lands mid-run, and the
    # job is stopped (distqat.status --stop) once the new replica has trained a few
    outer_steps = 100_000
    agents = Agents(launcher, f"127.0.0.1:{free_port()}",
                    extra=[f"diloco.outer_steps={outer_steps}", "eval_every=0"])
    agents.start_store_host()
    agents.start()
    _wait_for_outer_step(agents, 5)
    agents.start()  # a new host joins while training runs
    fleet = launcher.cwd / "runs" / "tiny" / "fleet.json"
    deadline = time.monotonic() + 120
    while len(json.loads(fleet.read_text())["rounds"]) < 2:
        assert time.monotonic() < deadline, agents.log_tails()
        time.sleep(0.2)
    resumed = json.loads(fleet.read_text())["rounds"][1]["resumed_from_outer_step"]
    _wait_for_outer_step(agents, resumed + 3)
    request(launcher.cwd / "runs" / "tiny", STOP)
    agents.wait_all(agents.hosts, timeout=120)
    assert [p.returncode for p in agents.hosts] == [0, 0, 0], agents.log_tails()
    summary = launcher.summary()
    assert summary["exit_reason"] == "stopped"
    assert [r["world_size"] for r in summary["rounds"]] == [4, 6]
    assert summary["num_replicas"] == 3 and summary["world_size"] == 6
    done = summary["outer_steps_done"]
    assert resumed + 3 <= done < outer_steps
    new_replica = [r for r in summary["replicas"] if r["replica"] == 2]
    assert new_replica and new_replica[0]["inner_steps_done"] == done * INNER_STEPS
    assert new_replica[0]["samples"] > 0  # it trained in this round, not only reported
    assert len(summary["recoveries"]) == 1, summary["recoveries"]
    assert summary["recoveries"][0]["steps_lost"] <= INNER_STEPS


def _etcd_or_skip(tmp_path: Path):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (.ci/run installs Debian's etcd-server)")
    pytest.importorskip("etcd", reason="python-etcd is not installed (pip install -e .[etcd])")
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "etcd.sh"), "--client-port",
                             str(client), "--peer-port", str(peer), "--data-dir",
                             str(tmp_path / "etcd")], stdout=open(tmp_path / "etcd.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, client


@pytest.mark.timeout(300)
def test_killed_host_resumes_on_etcd_v2_even_the_first_one(launcher, tmp_path):
    etcd, port = _etcd_or_skip(tmp_path)
    try:
        deadline = time.monotonic() + 20
        import urllib.request
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "etcd.log").read_text()
            time.sleep(0.2)
        outer_steps = 40
        agents = Agents(launcher, f"127.0.0.1:{port}", backend="etcd-v2",
                        extra=[f"diloco.outer_steps={outer_steps}", "eval_every=0"])
        victim = agents.start()  # with etcd no agent holds the rendezvous: any may die
        time.sleep(1)
        _kill_and_recover(agents, victim, [agents.start(), agents.start()], outer_steps)
    finally:
        etcd.kill()
        etcd.wait(10)


def _host_of_rank(agents: Agents, rank: int):
    for host in agents.hosts:
        for proc in psutil.Process(host.pid).children(recursive=True):
            try:
                if proc.environ().get("RANK") == str(rank):
                    return host
            except psutil.Error:
                continue
    raise AssertionError(f"no host runs rank {rank}")


def _spare_hosts(agents: Agents, logs: Path) -> list:
    """The hosts whose worker hosts no stage in the current round (newest log lines)."""
    spares = []
    for host in agents.alive():
        for proc in psutil.Process(host.pid).children(recursive=True):
            try:
                rank = proc.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "hosting stage" not in (logs / f"rank{rank}.log").read_text():
                spares.append(host)
    return spares


@pytest.mark.timeout(360)
def test_dead_spares_never_delay_the_job(launcher):
    """4 agents x 1 worker, 2 stages: one replica and two spares. A spare's host dies early:
    the job notices it during the run (rank 0 sees its heartbeat stop), ends the round
    after the next outer step with nothing lost, and goes on without it. The other dies in
    the job's last seconds, too late to be noticed during the run: the workers find it
    missing when they leave, and the agents meet once more without it (the round resumes
    at the last outer step, so it ends at once). Every agent exits promptly after the last
    outer step instead of waiting on the dead (367 s before: RECIPES.md)."""
    outer_steps = 120  # the first death is noticed after 4 s, well before the end
    agents = Agents(launcher, f"127.0.0.1:{free_port()}", nproc_per_node=1, nnodes="2:4",
                    extra=[f"diloco.outer_steps={outer_steps}", "eval_every=0",
                           "model_pipeline.max_replicas=1", "comm.lost_after=4"])
    agents.start_store_host()
    for _ in range(3):
        agents.start()
    logs = launcher.cwd / "runs" / "tiny" / "logs"
    _wait_for_outer_step(agents, 3)
    agents.kill_host(_spare_hosts(agents, logs)[0])
    deadline = time.monotonic() + 240
    while len(json.loads((launcher.cwd / "runs/tiny/fleet.json").read_text())["rounds"]) < 2:
        assert time.monotonic() < deadline, agents.log_tails()
        time.sleep(0.2)
    while agents.outer_step_reached() < outer_steps - 2:
        assert time.monotonic() < deadline, agents.log_tails()
        assert all(h.poll() is None for h in agents.alive()) and len(agents.alive()) == 3, \
            agents.log_tails()
        time.sleep(0.1)
    (late,) = _spare_hosts(agents, logs)
    agents.kill_host(late)
    survivors = agents.alive()
    while agents.outer_step_reached() < outer_steps:
        assert time.monotonic() < deadline, agents.log_tails()
        assert all(h.poll() is None for h in survivors), agents.log_tails()
        time.sleep(0.2)
    last_outer_step = time.monotonic()
    agents.wait_all(survivors, timeout=120)
    exited = time.monotonic() - last_outer_step
    assert [h.returncode for h in survivors] == [0, 0], agents.log_tails()
    assert exited < 30, f"the agents exited {exited:.0f} s after the last outer step"
    summary = launcher.summary()
    assert summary["exit_reason"] == "completed" and summary["outer_steps_done"] == outer_steps
    assert [r["world_size"] for r in summary["rounds"]] == [4, 3, 2], summary["rounds"]
    early, at_end = summary["recoveries"]
    assert "silent for more than" in early["cause"] and early["steps_lost"] == 0, early
    assert early["resumed_from_outer_step"] < outer_steps - 2, early
    assert "at the end of the job" in at_end["cause"] and at_end["steps_lost"] == 0, at_end
    assert at_end["resumed_from_outer_step"] == outer_steps, at_end
    print(f"spares killed: recoveries {early['seconds']:.1f} s and {at_end['seconds']:.1f} s; "
          f"agents exited {exited:.1f} s after the last outer step")


@pytest.mark.parametrize("ephemeral", [None, "1024 65535"])
def test_free_ports_are_never_ones_a_listener_on_port_0_takes(ephemeral, tmp_path, monkeypatch):
    """Outside the kernel's ephemeral range (it never hands those out on its own), or, where
    that range covers nearly every port, even ones (its bind(0) takes odd ones); either way
    a server started on one a moment later finds it free."""
    if ephemeral is not None:
        (tmp_path / "range").write_text(ephemeral)
        monkeypatch.setattr(dq_dist, "EPHEMERAL_RANGE_FILE", str(tmp_path / "range"))
    low, high = (int(v) for v in Path(dq_dist.EPHEMERAL_RANGE_FILE).read_text().split())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        if ephemeral is None:
            assert not low <= port <= high, (port, low, high)
        else:
            assert port % 2 == 0 and port >= dq_dist.LOWEST_PICKED_PORT, port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    if ephemeral is not None:  # and this kernel's bind(0) does take odd ports
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            assert s.getsockname()[1] % 2 == 1
