"""``python -m distqat.status``: what a running and a finished job report, ``--save`` and
``--stop`` reaching a real job (4 workers, 2 stages x 2 replicas), and SIGTERM to one
host's launcher stopping the whole job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distqat.checkpoint.store import load_latest
from distqat.config import CONFIG_FILE, config_from_yaml
from distqat.elastic.dist import free_port
from distqat.pipeline.build import IO_FILE, build_stages

from conftest import ROOT, tagged_processes
from localcluster import LocalCluster

STATUS_TIMEOUT = 60


def status(run: Path, *args: str):
    proc = subprocess.run([sys.executable, "-m", "distqat.status", str(run), *args],
                          capture_output=True, text=True, timeout=STATUS_TIMEOUT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stdout, proc.stderr


def wait_for(what: str, until, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = until()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the job ended while waiting for {what}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout} s")


def live_outer_step(run: Path) -> int:
    code, out, _ = status(run, "--json")
    return json.loads(out)["outer_steps_done"] if code == 0 else 0


def stage_params(run: Path, folder: Path, stage: int):
    """The parameters of ``stage`` as ``folder/final/stage<s>.pt`` holds them, in the
    order of the module's parameters (the order a checkpoint's global copy keeps)."""
    cfg = config_from_yaml((run / CONFIG_FILE).read_text(), "config")
    io = json.loads((run / IO_FILE).read_text())
    module = build_stages(cfg, io, [stage])[stage]
    module.load_state_dict(torch.load(folder / "final" / f"stage{stage}.pt", weights_only=True))
    return [p.detach() for p in module.parameters()]


@pytest.mark.timeout(300)
def test_status_save_and_stop_on_a_running_job(launcher):
    proc = launcher.start("--nproc", "4", "diloco.outer_steps=100000", "eval_every=0")
    run = launcher.cwd / "runs" / "tiny"
    wait_for("outer step 3", lambda: live_outer_step(run) >= 3, proc)

    code, out, err = status(run)
    assert code == 0, err
    assert "RUNNING" in out and "world size 4, complete pipelines 2" in out, out
    assert "model mlp, 2 stages" in out and "ETA" in out, out
    live = json.loads(status(run, "--json")[1])
    assert live["state"] == "running" and live["exit_reason"] is None
    assert [r["replica"] for r in live["replicas"]] == [0, 1]
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in live["replicas"])
    assert live["eta_s"] > 0 and live["inner_steps_total"] == 1_000_000
    assert len(live["rounds"]) == 1 and live["restarts"] == 0

    # --save: a snapshot of the next outer step, and training goes on
    code, out, err = status(run, "--save")
    assert code == 0 and "save request" in out, err
    saved = wait_for("a saved snapshot", lambda: sorted((run / "saved").glob("outer*/final")),
                     proc)
    snapshot = saved[0].parent
    saved_step = int(snapshot.name[len("outer"):])
    wait_for("files of every stage", lambda: all(
        (snapshot / "final" / f"stage{s}.pt").is_file() for s in (0, 1)), proc)
    assert (snapshot / CONFIG_FILE).is_file() and (snapshot / IO_FILE).is_file()
    wait_for("training past the snapshot", lambda: live_outer_step(run) >= saved_step + 2, proc)
    # consumed once written (each host's watcher looks every second)
    wait_for("the save request consumed", lambda: not (run / "control" / "save.json").exists(),
             proc, timeout=10)

    # --stop: the current outer step finishes, every worker exits 0, stages are saved
    code, out, err = status(run, "--stop")
    assert code == 0 and "stop request" in out, err
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the job did not stop within 60 s of --stop")
    assert proc.returncode == 0, out[-4000:]
    summary = launcher.summary()
    stopped_at = summary["outer_steps_done"]
    assert summary["exit_reason"] == "stopped" and stopped_at > saved_step + 1, summary
    assert summary["inner_steps_done"] == stopped_at * 10
    assert not (run / "control" / "stop.json").exists()  # consumed: the next run trains
    # the last checkpoint is the stop's outer step, and it holds the final stages
    (folder,) = (launcher.cwd / "checkpoints" / "tiny").iterdir()
    for stage in (0, 1):
        step, state = load_latest(folder, stage)
        assert step == stopped_at
        final = stage_params(run, run, stage)
        assert len(final) == len(state["global_params"])
        for mine, saved_param in zip(final, state["global_params"]):
            assert torch.equal(mine, saved_param)
    # the snapshot is the stages of its outer step: not the final ones
    assert not all(torch.equal(a, b) for a, b in zip(stage_params(run, snapshot, 0),
                                                     stage_params(run, run, 0)))

    code, out, err = status(run)
    assert code == 0 and "ENDED (stopped)" in out, out
    ended = json.loads(status(run, "--json")[1])
    assert ended["state"] == "ended" and ended["exit_reason"] == "stopped"
    assert ended["outer_steps_done"] == stopped_at and ended["eta_s"] is None
    code, out, err = status(run, "--stop")
    assert code == 2 and "the job has ended (stopped); nothing to stop" in err, (out, err)
    assert not tagged_processes(launcher.tag), "processes left behind"


def test_status_of_a_folder_that_is_no_run_exits_2(tmp_path):
    code, out, err = status(tmp_path / "nope")
    assert code == 2 and out == ""
    assert err.strip() == (f"distqat: {tmp_path / 'nope'}: not a run folder (no config.yaml); "
                           "expected runs/<experiment_prefix> of a job that has started")


@pytest.mark.timeout(240)
def test_sigterm_to_one_hosts_launcher_stops_the_whole_job(launcher):
    """SIGTERM to one host's ``launch/host.sh`` (what a cluster sends a host it reclaims):
    the whole job finishes its outer step, saves, and every host exits 0."""
    cluster = LocalCluster(launcher.cwd, f"127.0.0.1:{free_port()}",
                           job_id=f"job-{launcher.tag[:8]}", nnodes="2", nproc_per_node=2,
                           args=["diloco.outer_steps=100000", "eval_every=0"],
                           env=launcher.env())
    hosts = [cluster.add_store_host()]  # the first agent hosts the c10d store
    hosts.append(cluster.add_host())
    launcher.procs.extend(hosts)
    run = launcher.cwd / "runs" / "tiny"
    wait_for("outer step 3", lambda: live_outer_step(run) >= 3, hosts[0])
    hosts[1].send_signal(signal.SIGTERM)
    for host in hosts:
        try:
            host.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a host did not stop within 90 s:\n{cluster.log_tails()}")
    assert [h.returncode for h in hosts] == [0, 0], cluster.log_tails()
    summary = launcher.summary()
    assert summary["exit_reason"] == "stopped" and summary["world_size"] == 4, summary
    assert 3 <= summary["outer_steps_done"] < 100000
    assert "stop request" in cluster.logs[1].read_text()
