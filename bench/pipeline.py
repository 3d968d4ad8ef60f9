"""Pipeline throughput against the single-process baseline, and the cost of one RPC.

    python bench/pipeline.py [--repeats 3] [--microbatches 1 2 4 8] [--models tiny wide]

For each model size: samples/s of the 2-stage pipeline (2 worker processes, 1 thread
each, one replica, through ``python -m distqat.local``) for each micro-batch count,
against the baseline (``mode=baseline``: the full model in 1 process with 2 threads) on
the same model, batch and steps; then the round trip of ``rpc_sync`` with a 1 MB tensor
between two processes. samples/s is what ``summary.json`` reports (training time only,
no start-up). Medians over ``--repeats`` runs; the ratio is pipeline / baseline.
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


def _median_run(args: list[str], threads: int, repeats: int) -> tuple[float, list[float]]:
    values = [_run(args, threads) for _ in range(repeats)]
    return statistics.median(values), values


def _rpc_peer(rank: int, port: int, size: int, rounds: int, queue) -> None:
    import torch
    import torch.distributed.rpc as rpc

    torch.set_num_threads(1)
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                           num_worker_threads=4,
                                           _transports=["uv"])  # as distqat's default
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


def rpc_round_trip(size: int = 1 << 20, rounds: int = 200) -> list[float]:
    import multiprocessing as mp

    sys.path.insert(0, str(ROOT))
    from distqat.elastic.dist import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rpc_peer, args=(r, port, size, rounds, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    print(f"# bench/pipeline.py, {args.repeats} runs each, medians (samples/s)\n")
    print("| model | setup | samples/s (median) | runs | pipeline / baseline |")
    print("|---|---|---|---|---|")
    for model in args.models:
        base_args = COMMON + MODELS[model] + ["mode=baseline"]
        base, base_runs = _median_run(base_args, threads=2, repeats=args.repeats)
        runs_txt = ", ".join(f"{v:.0f}" for v in base_runs)
        print(f"| {model} | baseline, 1 process x 2 threads | {base:.0f} | {runs_txt} | 1.00 |",
              flush=True)
        for m in args.microbatches:
            pipe_args = (["--nproc", "2"] + COMMON + MODELS[model]
                         + ["model_pipeline.num_stages=2", f"model_pipeline.num_microbatches={m}"])
            pipe, pipe_runs = _median_run(pipe_args, threads=1, repeats=args.repeats)
            runs_txt = ", ".join(f"{v:.0f}" for v in pipe_runs)
            print(f"| {model} | pipeline 2 stages x 1 thread, {m} micro-batches | {pipe:.0f} "
                  f"| {runs_txt} | {pipe / base:.2f} |", flush=True)

    times = rpc_round_trip()
    ms = sorted(t * 1000 for t in times)
    print(f"\nrpc_sync round trip with a 1 MB tensor (sent and returned), {len(ms)} calls: "
          f"median {statistics.median(ms):.3f} ms, p10 {ms[len(ms) // 10]:.3f} ms, "
          f"p90 {ms[9 * len(ms) // 10]:.3f} ms")


if __name__ == "__main__":
    main()
