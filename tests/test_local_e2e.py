"""``python -m distqat.local`` end to end: real elastic launcher, real RPC, real groups."""

import signal
import time

import pytest

from distqat.monitor.summary import SUMMARY_KEYS

from conftest import tagged_processes


def _event_files(run, sub):
    return list((run / sub).glob("events.out.tfevents.*"))


@pytest.mark.timeout(300)
def test_default_task_learns_with_2_stages_x_2_replicas(runs):
    code, out, launcher = runs.get("--nproc", "4")
    assert code == 0, out[-4000:]
    summary = launcher.summary()
    for key in SUMMARY_KEYS:
        assert summary.get(key) is not None, f"summary.json lacks {key}"
    assert summary["exit_reason"] == "completed"
    assert (summary["world_size"], summary["num_stages"], summary["num_replicas"]) == (4, 2, 2)
    assert summary["inner_steps_done"] == 200 and summary["outer_steps_done"] == 20
    assert summary["loss_last"] < 0.5 * summary["loss_first"], summary
    assert summary["eval_last"]["accuracy"] > summary["eval_first"]["accuracy"] + 0.3
    assert summary["samples_per_s"] > 0 and summary["bytes_allreduced"] > 0
    run = launcher.cwd / "runs" / "tiny"
    for sub in ("replica0", "replica1", "stage0-replica0", "stage1-replica1", "fleet"):
        assert _event_files(run, sub), f"no event file in {sub}"
    assert sorted(p.name for p in (run / "logs").iterdir()) == [f"rank{r}.log" for r in range(4)]
    assert not tagged_processes(launcher.tag), "processes left behind"


@pytest.mark.timeout(120)
def test_baseline_mode_trains_full_model_in_one_process(launcher):
    code, out = launcher.run("mode=baseline", "diloco.outer_steps=5")
    assert code == 0, out[-4000:]
    summary = launcher.summary()
    assert summary["mode"] == "baseline" and summary["world_size"] == 1
    assert summary["inner_steps_done"] == 50
    assert summary["loss_last"] < summary["loss_first"]
    assert (launcher.cwd / "runs" / "tiny" / "final" / "full.pt").is_file()


@pytest.mark.timeout(180)
def test_sigint_ends_every_worker_and_still_writes_summary(launcher):
    proc = launcher.start("--nproc", "4", "diloco.outer_steps=100000")
    log = launcher.cwd / "runs" / "tiny" / "logs" / "rank0.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.is_file() and "step 10 " in log.read_text():
            break
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        time.sleep(0.5)
    else:
        pytest.fail("training did not start within 120 s")
    workers = [p for p in tagged_processes(launcher.tag) if p.pid != proc.pid]
    assert len(workers) >= 4
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, out[-4000:]
    assert took < 30, f"took {took:.1f} s to stop"
    summary = launcher.summary()
    assert summary["exit_reason"] == "interrupted"
    time.sleep(1)
    assert not tagged_processes(launcher.tag), "processes left behind"


@pytest.mark.timeout(180)
def test_two_torchrun_agents_through_launch_host_sh(launcher):
    """The multi-host path on one machine: two real torchrun agents meet at a c10d
    rendezvous on 127.0.0.1 and train 2 stages x 1 replica (one worker per agent)."""
    import subprocess

    from distqat.elastic.dist import free_port

    from conftest import ROOT

    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen(
        ["bash", str(ROOT / "launch" / "host.sh"), "--rdzv-endpoint", endpoint,
         "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-id", launcher.tag,
         "diloco.outer_steps=2", "eval_every=0"],
        cwd=launcher.cwd, env=launcher.env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    launcher.procs.extend(agents)
    outs = [a.communicate(timeout=150)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    summary = launcher.summary()
    assert summary["exit_reason"] == "completed"
    assert (summary["world_size"], summary["num_replicas"]) == (2, 1)
    assert summary["outer_steps_done"] == 2


@pytest.mark.timeout(180)
def test_outer_steps_write_verified_checkpoints_equal_to_final_stages(launcher, tmp_path):
    import torch

    from distqat import checkpoint

    shared = tmp_path / "shared"
    code, out = launcher.run("--nproc", "4", "diloco.outer_steps=4", "eval_every=0",
                             "param_mirror.keep=2", f"param_mirror.shared_dir={shared}")
    assert code == 0, out[-4000:]
    run = launcher.cwd / "runs" / "tiny"
    job = launcher.summary()["run_id"]  # checkpoints are scoped by the job's id
    folders = [launcher.cwd / "checkpoints" / "tiny" / job, shared / "tiny" / job]
    for stage in (0, 1):
        final = torch.load(run / "final" / f"stage{stage}.pt", weights_only=True)
        params = list(final.values())
        for folder in folders:
            assert checkpoint.list_checkpoints(folder, stage) == [3, 4]
            step, state = checkpoint.load_latest(folder, stage)
            assert step == 4 and state["outer_step"] == 4 and state["stage"] == stage
            assert state["inner_steps_done"] == 40
            assert len(state["global_params"]) == len(params)
            for saved, want in zip(state["global_params"], params):
                assert torch.equal(saved, want)
