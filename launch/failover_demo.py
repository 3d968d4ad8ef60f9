"""Failover demo: several hosts on this machine train one job; one is killed mid-run,
another joins later; the recovery timeline is printed at the end.

    python launch/failover_demo.py [--hosts 3] [--kill-at 8] [--add-at 20] [key=value ...]

Each host is a torchrun agent with 2 workers (launch/host.sh, c10d rendezvous on
127.0.0.1). Host 0 holds the c10d rendezvous store, so the demo kills the last host, at
outer step ``--kill-at``, and starts a new one at outer step ``--add-at``. Output: the
hosts' events, the rounds (world size, step resumed from), and each recovery (seconds
from the failure noticed to the first step after the rebuild, inner steps lost).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distqat.elastic.dist import free_port  # noqa: E402
from localcluster import LocalCluster  # noqa: E402  (beside this file)


def wait_for_step(cluster: LocalCluster, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while cluster.outer_step_reached() < step:
        if time.monotonic() > deadline or not cluster.alive():
            raise SystemExit(f"training did not reach outer step {step}:\n{cluster.log_tails()}")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=8, help="outer step of the kill")
    parser.add_argument("--add-at", type=int, default=20, help="outer step of the join")
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    parser.add_argument("overrides", nargs="*", default=["diloco.outer_steps=60",
                                                         "eval_every=0"])
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distqat-failover-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(workdir, f"127.0.0.1:{free_port()}", job_id=uuid.uuid4().hex[:8],
                           nnodes=f"2:{args.hosts + 1}", args=args.overrides)
    print(f"workdir {workdir}")
    try:
        cluster.add_store_host()  # host 0 binds the endpoint: it holds the c10d store
        for _ in range(args.hosts - 1):
            cluster.add_host()
        wait_for_step(cluster, args.kill_at, 180)
        cluster.kill_host(cluster.hosts[-1])
        wait_for_step(cluster, args.add_at, 180)
        cluster.add_host()
        if not cluster.wait(600):
            print("the job did not finish in 600 s", file=sys.stderr)
            return 1
    finally:
        cluster.close()
    t0 = cluster.timeline[0][0]
    print("\nhosts:")
    for t, event in cluster.timeline:
        print(f"  {t - t0:7.1f} s  {event}")
    summary = json.loads((workdir / "runs" / "tiny" / "summary.json").read_text())
    print("rounds:")
    for r in summary["rounds"]:
        print(f"  {r['started'] - t0:7.1f} s  world {r['world_size']}, {r['num_replicas']} "
              f"replicas, resumed from outer step {r['resumed_from_outer_step']}")
    print("recoveries:")
    for r in summary["recoveries"]:
        print(f"  {r['seconds']:.1f} s, {r['steps_lost']} inner steps lost; replica "
              f"{r['loss_replica']}'s loss on the resumed batch: {r['loss_before']} before, "
              f"{r['loss_after']} after")
    print(f"end: {summary['exit_reason']}, outer step {summary['outer_steps_done']}, loss "
          f"{summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
