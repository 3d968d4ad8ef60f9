"""Failover: recovery time and work lost over many host kills, and what checkpointing costs.

    python bench/failover.py [--kills 10] [--hosts 3] [--seed 0] [--repeats 5] [--only kills|checkpoints]

Part 1: one job on ``--hosts`` simulated hosts (torchrun agents with 2 workers each,
c10d on 127.0.0.1, the tiny config with many outer steps). Repeatedly: wait a random
1..8 s after training has resumed, kill a random host (agent and workers, SIGKILL; never
host 0, which holds the c10d store), then start a replacement host so the next kill
finds a full fleet. Every membership change is a new round; the job's ``fleet.json``
records each recovery: seconds from the first worker noticing the change to the first
inner step after the rebuild, and inner steps lost (furthest step reached minus the step
resumed from). Kills and joins are reported apart (a join also stops the round).

Part 2: samples/s of ``python -m distqat.local`` (tiny config, 4 workers) with
checkpoints on and off, ``--repeats`` interleaved pairs, at two outer-step rates: the
step-time overhead of checkpointing every outer step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))
from distqat.elastic.dist import free_port  # noqa: E402
from localcluster import LocalCluster  # noqa: E402

INNER_STEPS = 10


def _fleet(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "runs" / "tiny" / "fleet.json").read_text())
    except (OSError, ValueError):
        return {"rounds": [], "recoveries": []}


def _wait_recoveries(cluster: LocalCluster, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(_fleet(cluster.workdir)["recoveries"]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no recovery #{count} within {timeout} s:\n{cluster.log_tails()}")
        time.sleep(0.2)


def kills(n: int, hosts: int, seed: int) -> None:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="distqat-bench-failover-"))
    cluster = LocalCluster(workdir, f"127.0.0.1:{free_port()}", job_id=uuid.uuid4().hex[:8],
                           nnodes=f"2:{hosts}",
                           args=["diloco.outer_steps=100000", "eval_every=0", "log_every=1000",
                                 f"diloco.inner_steps={INNER_STEPS}"])
    kill_rounds = []
    try:
        cluster.add_store_host()  # host 0 binds the endpoint: it holds the c10d store
        for _ in range(hosts - 1):
            cluster.add_host()
        deadline = time.monotonic() + 120
        while cluster.outer_step_reached() < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"training did not start:\n{cluster.log_tails()}")
            time.sleep(0.5)
        recoveries = 0
        for i in range(n):
            time.sleep(rng.uniform(1, 8))
            victim = rng.choice([h for h in cluster.alive() if h is not cluster.hosts[0]])
            cluster.kill_host(victim)
            recoveries += 1
            kill_rounds.append(recoveries)
            _wait_recoveries(cluster, recoveries, 120)
            cluster.add_host()
            recoveries += 1
            _wait_recoveries(cluster, recoveries, 120)
            print(f"kill {i + 1}/{n} done", file=sys.stderr, flush=True)
    finally:
        cluster.close()
    recs = _fleet(workdir)["recoveries"]
    by_kind = {"kill": [r for i, r in enumerate(recs, 1) if i in kill_rounds],
               "join": [r for i, r in enumerate(recs, 1) if i not in kill_rounds]}
    print(f"## Recovery over {n} kills ({hosts} hosts x 2 workers, c10d, tiny config, "
          f"inner_steps={INNER_STEPS})\n")
    print("| event | count | recovery s median | worst | best | inner steps lost median | worst |")
    print("|---|---|---|---|---|---|---|")
    for kind, rs in by_kind.items():
        secs = [r["seconds"] for r in rs]
        lost = [r["steps_lost"] for r in rs]
        if rs:
            print(f"| {kind} | {len(rs)} | {statistics.median(secs):.1f} | {max(secs):.1f} | "
                  f"{min(secs):.1f} | {statistics.median(lost):.0f} | {max(lost)} |")
    checks = [r for r in recs if r.get("loss_before") is not None]
    worst = max((abs(r["loss_after"] - r["loss_before"]) for r in checks), default=None)
    print(f"\nloss of the resumed model on the resumed batch, before vs after: {len(checks)} of "
          f"{len(recs)} recoveries paired, largest difference {worst}")
    print(f"per-kill seconds: {[round(r['seconds'], 1) for r in by_kind['kill']]}")
    _phases(workdir)


def _phases(workdir: Path) -> None:
    """Where a recovery's seconds go, from rank 0's log of the last round."""
    lines = [l for l in (workdir / "runs" / "tiny" / "logs" / "rank0.log").read_text().splitlines()
             if "round set up" in l]
    if lines:
        print(f"rank 0, last round set-up (from process start): {lines[-1].split(': ', 1)[1]}")


# (label, overrides): the tiny config's outer step every ~0.1 s, and one 5x rarer; both
# train 600 inner steps per replica
CHECKPOINT_CONFIGS = [
    ("tiny, inner_steps=10, 60 outer steps", ["diloco.inner_steps=10", "diloco.outer_steps=60"]),
    ("tiny, inner_steps=50, 12 outer steps", ["diloco.inner_steps=50", "diloco.outer_steps=12"]),
]


def checkpoint_overhead(repeats: int) -> None:
    def run(enabled: bool, overrides: list) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "distqat.local", "--nproc", "4", "eval_every=0",
                   *overrides, f"param_mirror.enable={str(enabled).lower()}"]
            env = {**os.environ, "DISTQAT_NO_PROGRESS": "1",  # this checkout's distqat
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")]))}
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600,
                                  env=env)
            if done.returncode != 0:
                raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
            return json.loads((Path(tmp) / "runs/tiny/summary.json").read_text())["samples_per_s"]

    print(f"\n## Checkpoint overhead (tiny config, 4 workers, {repeats} runs each, "
          f"on and off interleaved)\n")
    print("samples/s is summary.json's; overhead = samples/s off / samples/s on - 1, of the "
          "medians and per pair (a pair: one run on, then one off, back to back).\n")
    print("| config | samples/s on (median) | off (median) | overhead (medians) "
          "| overhead per pair (median) | on runs | off runs |")
    print("|---|---|---|---|---|---|---|")
    for label, overrides in CHECKPOINT_CONFIGS:
        on, off = [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            on.append(run(True, overrides))
            off.append(run(False, overrides))
        of_medians = statistics.median(off) / statistics.median(on) - 1
        per_pair = statistics.median(f / n - 1 for n, f in zip(on, off))
        print(f"| {label} | {statistics.median(on):.0f} | {statistics.median(off):.0f} "
              f"| {100 * of_medians:+.1f} % | {100 * per_pair:+.1f} % "
              f"| {', '.join(f'{v:.0f}' for v in on)} | {', '.join(f'{v:.0f}' for v in off)} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["kills", "checkpoints"], default=None,
                        help="run one part only")
    args = parser.parse_args()
    print(f"# `python bench/failover.py {' '.join(sys.argv[1:])}`\n")
    if args.only != "checkpoints":
        kills(args.kills, args.hosts, args.seed)
    if args.only != "kills":
        checkpoint_overhead(args.repeats)


if __name__ == "__main__":
    main()
