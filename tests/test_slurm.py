"""slurm/distqat.sbatch on a real SLURM: a slurmctld and three slurmd "nodes" on this
machine (tests/slurm_cluster.py). The job trains on all three nodes and completes; goes on
when one node dies mid-run (its slurmd and every process of the job on it killed); and,
requeued mid-run, runs again and resumes from its last outer step.

Each job is 3 nodes x 1 worker, one stage, so 3 DiLoCo replicas. Every wait is bounded,
jobs are cancelled and every process of the cluster ended by PID at teardown."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Dict, Set, Tuple

import psutil
import pytest

from conftest import ROOT, TAG_VAR, kill_tagged
from slurm_cluster import SlurmCluster, SlurmError, free_port, missing_tools

SCRIPT = ROOT / "slurm" / "distqat.sbatch"
JOB_TIMEOUT = 150
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs "
                    "Debian's slurm-wlm, slurmctld, slurmd, slurm-client and munge)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmError, OSError) as e:
        cluster.close()
        pytest.skip(f"could not start a local SLURM cluster: {e}")
    yield cluster
    cluster.close()


class Job:
    """One submission of the batch script from its own folder, tagged so that every
    process it starts can be found (and ended) by PID."""

    def __init__(self, cluster: SlurmCluster, cwd: Path, *train_args: str,
                 options=("--nodes=3",), min_nodes: int = 3):
        self.cluster, self.cwd = cluster, cwd
        self.tag = f"slurm-{cwd.name}-{time.monotonic_ns()}"
        env = {TAG_VAR: self.tag, "DISTQAT_HOME": str(ROOT), "PYTHONPATH": str(ROOT),
               "DISTQAT_RDZV_PORT": str(free_port()), "DISTQAT_MIN_NODES": str(min_nodes)}
        self.submitted = time.monotonic()
        self.id = cluster.sbatch(
            SCRIPT, "--config", str(ROOT / "configs" / "tiny.yaml"),
            "model_pipeline.num_stages=1", "eval_every=0", "log_every=1000", *train_args,
            options=[*options, f"--output={cwd}/slurm-%j.out"], cwd=cwd, env=env)
        self.workers: Set[Tuple[str, str]] = set()  # (node, rank) of live workers seen

    def observe(self) -> None:
        """Note which node each live training worker runs on (its SLURMD_NODENAME)."""
        for proc in psutil.process_iter(["pid"]):
            try:
                env = proc.environ()
                if env.get(TAG_VAR) == self.tag and "LOCAL_RANK" in env and \
                        "distqat.train" in " ".join(proc.cmdline()):
                    self.workers.add((env.get("SLURMD_NODENAME", "?"), env.get("RANK", "?")))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def nodes_seen(self) -> Set[str]:
        return {node for node, _ in self.workers}

    def state(self) -> Dict[str, str]:
        return self.cluster.job(self.id)

    def wait(self, until, timeout: float = JOB_TIMEOUT, what: str = "") -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            self.observe()
            info = self.state()
            if until(info):
                return info
            if info["JobState"] in DONE or time.monotonic() > deadline:
                pytest.fail(f"job {self.id} is {info['JobState']} after "
                            f"{time.monotonic() - self.submitted:.0f} s, waiting for "
                            f"{what}:\n{self.logs()}")
            time.sleep(0.5)

    def wait_done(self, timeout: float = JOB_TIMEOUT) -> Dict[str, str]:
        return self.wait(lambda i: i["JobState"] in DONE, timeout, "the end")

    def outer_step_reached(self) -> int:
        steps = [int(p.name.split("step")[1][:8])
                 for p in self.cwd.glob("checkpoints*/**/stage0-step*.pt")]
        return max(steps, default=0)

    def wait_outer_step(self, step: int, timeout: float = 90) -> int:
        self.wait(lambda i: i["JobState"] == "RUNNING" and self.outer_step_reached() >= step,
                  timeout, f"outer step {step}")
        return self.outer_step_reached()

    def summary(self) -> dict:
        return json.loads((self.cwd / "runs" / "tiny" / "summary.json").read_text())

    def logs(self, chars: int = 3000) -> str:
        files = sorted(self.cwd.glob("slurm-*.out")) + sorted(self.cwd.glob("slurm-logs/*"))
        files += sorted(self.cwd.glob("runs/tiny/logs/*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in files)

    def close(self) -> None:
        self.cluster.run("scancel", self.id, check=False)
        kill_tagged(self.tag)


@pytest.fixture
def job_dir(tmp_path):
    jobs = []
    yield tmp_path, jobs
    for job in jobs:
        job.close()


def _submit(slurm, job_dir, *args, **kw) -> Job:
    cwd, jobs = job_dir
    job = Job(slurm, cwd, *args, **kw)
    jobs.append(job)
    return job


def _check_completed(job: Job, info: Dict[str, str], outer_steps: int) -> dict:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info}\n{job.logs()}"
    summary = job.summary()
    assert summary["exit_reason"] == "completed", summary
    assert summary["outer_steps_done"] == outer_steps, summary
    assert summary["run_id"] == f"slurm-{job.id}"  # the rendezvous id scopes checkpoints
    return summary


@pytest.mark.timeout(200)
def test_trains_on_all_three_nodes_and_completes(slurm, job_dir):
    outer_steps = 10
    job = _submit(slurm, job_dir, f"diloco.outer_steps={outer_steps}")
    info = job.wait_done()
    took = time.monotonic() - job.submitted
    summary = _check_completed(job, info, outer_steps)
    assert info["NodeList"] == "n[1-3]"
    assert summary["world_size"] == 3 and summary["num_replicas"] == 3, summary
    assert summary["restarts"] == 0, summary["rounds"]
    # a worker was seen on each node, and each of the 3 ranks on a node of its own
    assert job.nodes_seen() == {"n1", "n2", "n3"}, job.workers
    assert len({rank for _, rank in job.workers}) == 3, job.workers
    for node in ("n1", "n2", "n3"):
        out = (job.cwd / "slurm-logs" / f"{job.id}-{node}.out").read_text()
        assert f"distqat node {node}" in out, out
    print(f"submit -> done: {took:.1f} s")


@pytest.mark.timeout(240)
def test_node_killed_mid_run_the_others_finish(slurm, job_dir):
    outer_steps = 60
    job = _submit(slurm, job_dir, f"diloco.outer_steps={outer_steps}", min_nodes=2)
    job.wait(lambda i: i["JobState"] == "RUNNING" and len(job.nodes_seen()) == 3 and
             job.outer_step_reached() >= 5, what="training on 3 nodes, outer step 5")
    reached = job.outer_step_reached()
    killed = slurm.kill_node("n3")  # its slurmd, slurmstepd, agent and worker
    assert killed >= 4, killed
    try:
        info = job.wait_done()
        took = time.monotonic() - job.submitted
        summary = _check_completed(job, info, outer_steps)
        assert [r["world_size"] for r in summary["rounds"]][-2:] == [3, 2], summary["rounds"]
        (rec,) = summary["recoveries"]
        assert rec["resumed_from_outer_step"] >= reached - 1, rec
        assert summary["num_replicas"] == 2
        print(f"submit -> done: {took:.1f} s (n3 killed at outer step {reached}, "
              f"{killed} processes; recovery {rec['seconds']:.1f} s)")
    finally:
        slurm.start_node("n3")  # back for the next test (ReturnToService=2)
        slurm.wait_nodes_idle()


@pytest.mark.timeout(240)
def test_requeued_job_resumes_from_its_last_outer_step(slurm, job_dir):
    outer_steps = 60
    job = _submit(slurm, job_dir, f"diloco.outer_steps={outer_steps}")
    reached = job.wait_outer_step(5)
    requeued = time.monotonic()
    slurm.run("scontrol", "requeue", job.id)
    # SLURM holds a requeued job back for 120 s (its begin time); start it as soon as the
    # first run's processes are gone, which is what is tested here
    job.wait(lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING",
             what="the job to be pending again")
    slurm.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    job.wait(lambda i: i["Restarts"] == "1" and i["JobState"] == "RUNNING",
             what="the job to run again")
    again = time.monotonic() - requeued
    info = job.wait_done()
    took = time.monotonic() - job.submitted
    summary = _check_completed(job, info, outer_steps)
    assert info["Restarts"] == "1", info
    # the second run met under the same rendezvous id and resumed the first one's state
    resumed = summary["rounds"][-1]["resumed_from_outer_step"]
    assert reached - 1 <= resumed < outer_steps, (reached, summary["rounds"])
    assert summary["rounds"][-1]["world_size"] == 3
    out = (job.cwd / f"slurm-{job.id}.out").read_text()
    assert f"job {job.id} (restart 0)" in out and f"job {job.id} (restart 1)" in out, out
    print(f"submit -> done: {took:.1f} s (requeued at outer step {reached}, running again "
          f"{again:.1f} s later, resumed from outer step {resumed})")


@pytest.mark.timeout(200)
def test_time_limit_signal_stops_the_job_cleanly(slurm, job_dir):
    """``--signal=B:USR1@120`` sends SIGUSR1 to the batch script (only to it: "B:") ahead
    of the time limit; sent here by hand to the script's PID, it asks the job to stop
    (``distqat.status --stop``): every node finishes the current outer step, saves and
    exits 0, and the job is COMPLETED with ``exit_reason: stopped`` and its stages saved at
    the outer step it stopped at. (Not ``scancel --batch``: Slurm 22.05 also signals the
    script's children with it, srun among them, which then aborts the step.)"""
    outer_steps = 400
    job = _submit(slurm, job_dir, f"diloco.outer_steps={outer_steps}")
    job.wait_outer_step(3)
    scripts = [p for p in slurm.processes() if _environ(p).get(TAG_VAR) == job.tag
               and "slurm_script" in " ".join(p.cmdline())]
    assert len(scripts) == 1, [p.cmdline() for p in scripts]
    signalled = time.monotonic()
    scripts[0].send_signal(signal.SIGUSR1)
    info = job.wait_done(timeout=60)
    took = time.monotonic() - signalled
    out = (job.cwd / f"slurm-{job.id}.out").read_text()
    assert "SIGUSR1: asking the job to stop after its current outer step" in out, out
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{job.logs()}"
    for node in ("n1", "n2", "n3"):
        log = (job.cwd / "slurm-logs" / f"{job.id}-{node}.out").read_text()
        assert f"distqat node {node}: agent exited 0" in log, log
    summary = job.summary()
    stopped_at = summary["outer_steps_done"]
    assert summary["exit_reason"] == "stopped" and 3 <= stopped_at < outer_steps, summary
    assert job.outer_step_reached() == stopped_at  # the last checkpoint is the stop's
    assert (job.cwd / "runs" / "tiny" / "final" / "stage0.pt").is_file()
    assert not [p for p in slurm.processes() if TAG_VAR in _environ(p)]  # nothing left
    print(f"signal -> job stopped: {took:.1f} s, after outer step {stopped_at}")


@pytest.mark.timeout(60)
def test_bad_option_fails_the_job_with_a_message(slurm, job_dir):
    job = _submit(slurm, job_dir, "--min-nodes", "4")
    info = job.wait_done(timeout=30)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    out = (job.cwd / f"slurm-{job.id}.out").read_text()
    assert "--min-nodes: expected 1 to 3 (the nodes allocated), got '4'" in out, out


def _environ(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
