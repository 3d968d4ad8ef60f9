"""What the testbed's throttled links do besides their rate (``bench/simulate_check.py``).

    python bench/testbed_links.py [--rates 10mbit 100mbit 1gbit] [--bytes 810000]
                                  [--pieces 1 2 4 13] [--repeats 7] [--runs 2] [--json OUT]

Two hosts of ``simulate_check``'s testbed (network namespaces, ``tc tbf`` where the traffic
is forwarded), one gloo rank per host. Per rate:

* **DiLoCo's all-gather pieces.** Between two replicas DiLoCo all-gathers a compressed
  payload in pieces of ``distqat.diloco.ALLGATHER_CHUNK_BYTES`` (64 kB: 13 pieces for the
  0.81 MB int8 payload of ``simulate_check``'s MLP), all posted at once and waited in
  order. Timed here for each piece count, int8; each figure the median of ``--repeats``
  all-gathers after a barrier, per rank, over ``--runs`` fresh process pairs. Beside it:
  the link's own time ``N / beta`` (``distqat.plan_cost``'s ``beta``: 95 % of the rate).
* **The machine's CPU while the link is full both ways**: ~5 s of back-to-back fp32
  all-reduces of the same element count, and the shares of the whole machine's CPU time
  (``/proc/stat``: user, system, softirq) meanwhile. The stand-in hosts, their "routers"
  (bridges, ``tbf``) and the forwarding between them all share this machine's cores; real
  hosts each pay their own networking.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simulate_check as sc  # noqa: E402  (the testbed)

FULL_SECONDS = 5.0  # of back-to-back all-reduces, for the CPU shares

WORKER = r"""
import json, statistics, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
rank, master, nbytes, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pieces = [int(p) for p in sys.argv[5].split(",")]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=300))
payload = torch.zeros(nbytes, dtype=torch.int8)
outs = [torch.empty_like(payload) for _ in range(2)]
def all_gather(k):
    step = -(-nbytes // k)
    works = [dist.all_gather([o[s:s + step] for o in outs], payload[s:s + step], async_op=True)
             for s in range(0, nbytes, step)]
    for w in works:
        w.wait()
result = {"pieces": {}}
for k in pieces:
    all_gather(k)  # warm: connections, buffers
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        all_gather(k)
        times.append(time.perf_counter() - t)
    result["pieces"][k] = statistics.median(times)
def cpu():  # the whole machine's jiffies: user nice system idle iowait irq softirq
    return [int(v) for v in open("/proc/stat").readline().split()[1:8]]
full = torch.zeros(nbytes)
dist.barrier()
calls = int(sys.argv[6])  # as many on both ranks
before, t = cpu(), time.perf_counter()
for _ in range(calls):
    dist.all_reduce(full)
spent = [b - a for a, b in zip(before, cpu())]
result["allreduce_s"] = (time.perf_counter() - t) / calls
result["cpu"] = {name: spent[i] / sum(spent) for name, i in
                 (("user", 0), ("system", 2), ("softirq", 6), ("idle", 3))}
print("RESULT " + json.dumps(result), flush=True)
dist.destroy_process_group()
"""


def measure(bed: sc.Testbed, nbytes: int, pieces, repeats: int, calls: int,
            port: int) -> list:
    """One fresh gloo pair: per rank, {"pieces": {k: median seconds}, "allreduce_s",
    "cpu": shares}."""
    master = f"{bed.hosts[0].addr}:{port}"
    procs, logs = [], []
    for rank, h in enumerate(bed.hosts):
        log = h.cwd / f"ag-{uuid.uuid4().hex[:6]}.log"
        cmd = ["env", f"GLOO_SOCKET_IFNAME={h.ns}", sys.executable, "-c", WORKER, str(rank),
               master, str(nbytes), str(repeats), ",".join(map(str, pieces)), str(calls)]
        procs.append(bed.popen(h, cmd, log))
        logs.append(log)
    sc._wait_all(bed, procs, 600, "testbed links", logs, done_marker="RESULT ")
    results = [json.loads(next(line for line in log.read_text().splitlines()
                               if line.startswith("RESULT "))[7:]) for log in logs]
    for r in results:
        r["pieces"] = {int(k): v for k, v in r["pieces"].items()}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", default=["10mbit", "100mbit", "1gbit"])
    ap.add_argument("--bytes", type=int, default=810_000, help="payload per rank")
    ap.add_argument("--pieces", type=int, nargs="+", default=[1, 2, 4, 13])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs", type=int, default=2, help="fresh process pairs per rate")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    why = sc.unavailable()
    if why:
        print(f"bench/testbed_links.py: cannot run: {why}", file=sys.stderr)
        return 2
    from distqat import plan_cost
    from distqat.simulate import parse_bandwidth

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    rows, cpu_rows = [], []
    port = iter(range(29400, 29900))
    with tempfile.TemporaryDirectory(prefix="dqa") as tmp, sc.Testbed(2, Path(tmp)) as bed:
        for rate in (parse_bandwidth(r)[0] for r in a.rates):
            bed.throttle(rate)
            link_s = a.bytes / (rate / 8 * plan_cost.ETA)
            calls = max(3, round(FULL_SECONDS / (4 * link_s)))  # about 5 s of all-reduces
            per_run = [measure(bed, a.bytes, a.pieces, a.repeats, calls, next(port))
                       for _ in range(a.runs)]
            for k in a.pieces:
                times = [rank["pieces"][k] for run in per_run for rank in run]
                rows.append({"rate": rate, "pieces": k, "link_s": link_s, "times_s": times})
                print(f"{rate / 1e6:6g} Mbit/s  {k:3d} pieces of {a.bytes // k / 1e3:6.0f} kB: "
                      f"median {statistics.median(times) * 1e3:8.2f} ms "
                      f"(range {min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}), "
                      f"{statistics.median(times) / link_s:5.2f}x the link's "
                      f"{link_s * 1e3:.2f} ms", flush=True)
            shares = [run[0]["cpu"] for run in per_run]  # the machine's: one rank says it
            busy = {k: statistics.median(s[k] for s in shares)
                    for k in ("user", "system", "softirq")}
            ar = statistics.median(rank["allreduce_s"] for run in per_run for rank in run)
            cpu_rows.append({"rate": rate, "allreduce_s": ar, **busy})
            cores = os.cpu_count()
            print(f"{rate / 1e6:6g} Mbit/s  fp32 all-reduces back to back, {ar * 1e3:.2f} ms "
                  f"each (the link's {4 * link_s * 1e3:.2f}): the machine's CPU "
                  + ", ".join(f"{k} {v:.1%}" for k, v in busy.items())
                  + f": {sum(busy.values()) * cores:.2f} of {cores} cores busy", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"command": "python bench/testbed_links.py "
                                      + " ".join(argv or sys.argv[1:]), "pieces": rows,
                                      "cpu": cpu_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
