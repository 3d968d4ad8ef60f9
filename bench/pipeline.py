"""Pipeline throughput against the single-process baseline, per schedule, and the cost of
one RPC.

    python bench/pipeline.py [--repeats 3] [--microbatches 1 2 4 8] [--models tiny wide]
                             [--schedule gpipe 1f1b]
    python bench/pipeline.py --rpc-only --rpc-channels cma,basic basic mpt_uv --rpc-sizes 1 16

For each model size: samples/s of the 2-stage pipeline (2 worker processes, 1 thread
each, one replica, through ``python -m distqat.local``) for each schedule and micro-batch
count, against the baseline (``mode=baseline``: the full model in 1 process with 2
threads) on the same model, batch and steps; then the round trip of ``rpc_sync`` with a
1 MB tensor (``--rpc-sizes``) between two processes. ``--rpc-channels``: TensorPipe's
channels, one set per row: ``cma,basic`` is ``comm.rpc_channels: single`` on one host,
``basic`` the same where CMA is not there (between hosts), ``mpt_uv`` the
``multiplexed`` channel's 16 connections; default: TensorPipe's own choice. samples/s is
what ``summary.json`` reports (training time only, no start-up). The runs are interleaved
(each repeat runs every setup once, in turn), so a slow spell on a shared machine hits
all setups alike; medians over ``--repeats``; the ratio is pipeline / baseline, and with
both schedules 1f1b / gpipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the same steps for every run; one replica so the outer step is local (no all-reduce)
COMMON = ["diloco.inner_steps=10", "diloco.outer_steps=6", "eval_every=0",
          "log_every=1000"]
MODELS = {
    "tiny": ["model_pipeline.model_args.hidden=128", "model_pipeline.model_args.depth=4",
             "diloco.batch_size_per_step=64"],
    "wide": ["model_pipeline.model_args.hidden=1024", "model_pipeline.model_args.depth=6",
             "diloco.batch_size_per_step=256"],
}


def _run(args: list[str], threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DISTQAT_NO_PROGRESS="1", OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "distqat.local", *args, f"comm.threads_per_worker={threads}"]
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "runs" / "tiny" / "summary.json").read_text())["samples_per_s"]


def _rpc_peer(rank: int, port: int, size: int, rounds: int, queue, channels) -> None:
    import torch
    import torch.distributed.rpc as rpc

    torch.set_num_threads(1)
    chosen = {"_channels": channels} if channels else {}
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                           num_worker_threads=4,
                                           _transports=["uv"],  # as distqat's default
                                           **chosen)
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=opts)
    if rank == 0:
        x = torch.randn(size // 4)
        for _ in range(10):  # warm-up: connections, buffers
            rpc.rpc_sync("w1", torch.clone, args=(x,))
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            rpc.rpc_sync("w1", torch.clone, args=(x,))
            times.append(time.perf_counter() - t0)
        queue.put(times)
    rpc.shutdown()


def rpc_round_trip(size: int = 1 << 20, rounds: int = 200,
                   channels: list[str] | None = None) -> list[float]:
    import multiprocessing as mp

    sys.path.insert(0, str(ROOT))
    from distqat.elastic.dist import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rpc_peer, args=(r, port, size, rounds, queue, channels))
             for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _row(model: str, setup: str, runs: list[float], ratios: str) -> str:
    runs_txt = ", ".join(f"{v:.0f}" for v in runs)
    return f"| {model} | {setup} | {statistics.median(runs):.0f} | {runs_txt} | {ratios} |"


def bench_model(model: str, schedules: list[str], microbatches: list[int],
                repeats: int) -> None:
    """Every setup once per repeat, in turn; then the table rows of this model."""
    setups = {"baseline": (COMMON + MODELS[model] + ["mode=baseline"], 2)}
    for m in microbatches:
        for schedule in schedules:
            setups[(schedule, m)] = (["--nproc", "2"] + COMMON + MODELS[model]
                                     + ["model_pipeline.num_stages=2",
                                        f"model_pipeline.num_microbatches={m}",
                                        f"model_pipeline.schedule={schedule}"], 1)
    runs: dict = {key: [] for key in setups}
    for repeat in range(repeats):
        order = list(setups) if repeat % 2 == 0 else list(setups)[::-1]  # no drift bias
        for key in order:
            args, threads = setups[key]
            runs[key].append(_run(args, threads))
    base = statistics.median(runs["baseline"])
    print(_row(model, "baseline, 1 process x 2 threads", runs["baseline"], "1.00 |"), flush=True)
    for m in microbatches:
        for schedule in schedules:
            median = statistics.median(runs[(schedule, m)])
            vs_gpipe = ""
            if schedule != "gpipe" and "gpipe" in schedules:
                vs_gpipe = f"{median / statistics.median(runs[('gpipe', m)]):.2f}"
            print(_row(model, f"pipeline 2 stages x 1 thread, {schedule}, {m} micro-batches",
                       runs[(schedule, m)], f"{median / base:.2f} | {vs_gpipe}"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--schedule", nargs="+", default=["gpipe", "1f1b"],
                        choices=["gpipe", "1f1b"])
    parser.add_argument("--rpc-only", action="store_true", help="only the RPC round trips")
    parser.add_argument("--rpc-channels", nargs="+", default=[""], metavar="A,B",
                        help="TensorPipe channel sets, one per row (default: its own choice)")
    parser.add_argument("--rpc-sizes", type=float, nargs="+", default=[1], metavar="MB")
    args = parser.parse_args()

    if not args.rpc_only:
        print(f"# bench/pipeline.py, {args.repeats} interleaved runs each, medians "
              "(samples/s)\n")
        print("| model | setup | samples/s (median) | runs | pipeline / baseline "
              "| 1f1b / gpipe |")
        print("|---|---|---|---|---|---|")
        for model in args.models:
            bench_model(model, args.schedule, args.microbatches, args.repeats)

    for mb in args.rpc_sizes:
        for channels in args.rpc_channels:
            times = rpc_round_trip(int(mb * (1 << 20)), channels=channels.split(",")
                                   if channels else None)
            ms = sorted(t * 1000 for t in times)
            print(f"\nrpc_sync round trip with a {mb:g} MB tensor (sent and returned), "
                  f"channels {channels or 'TensorPipe default'}, {len(ms)} calls: "
                  f"median {statistics.median(ms):.3f} ms, p10 {ms[len(ms) // 10]:.3f} ms, "
                  f"p90 {ms[9 * len(ms) // 10]:.3f} ms")


if __name__ == "__main__":
    main()
