"""Streaming DiLoCo against plain DiLoCo: the outer-step wait on the training thread's
critical path, per window, at equal loss.

    python bench/streaming.py [--fragments 1 4] [--repeats 3] [--width 1024] [--depth 8]
                              [--inner-steps 20] [--outer-steps 5] [--overlap 1] [--alpha 0]

Two replica processes (1 thread each) on a real gloo group over loopback, no emulated
link: each trains the same MLP (``depth`` Linear(width, width)+ReLU blocks and a 10-way
head) with AdamW on its own shard of a synthetic classification task (labels from a
fixed random teacher), and keeps it in step with the other through the very
:class:`distqat.diloco.DiLoCo` / :class:`distqat.streaming.StreamingDiLoCo` object a stage
host uses, called as the stage host calls it (``inner_step_done`` after every inner step,
``outer_step`` at the window's end). Per window and replica it records

* ``wait``: seconds the training thread was blocked waiting for the outer step's
  collectives (``OuterStepStats.wait_seconds``), the figure the issue's goal is about;
* ``outer``: seconds the training thread spent in outer-step calls at all (the wait plus
  pseudo-gradients, encoding, outer optimizer, copies), timed around the calls;
* the window's wall time.

and at the end the eval loss (2,048 held-out samples) of the global model (what a
checkpoint holds) and of replica 0's local model. Runs are interleaved (each repeat runs
every setting once, in turn), so a slow spell on the shared 2-core machine hits all
alike; figures are medians over repeats of the per-run median window (first window
dropped: warm-up). On 2 cores the background all-reduce competes with training for the
CPU: its cost does not vanish, it moves from ``wait`` into slower inner steps, which the
window's wall time shows.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVAL_SAMPLES = 2048


def _model(width: int, depth: int):
    import torch
    from torch import nn
    torch.manual_seed(0)
    blocks = []
    for _ in range(depth):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def _batch(width: int, n: int, seed: int):
    """A shard's batch: 16 latent features from ``seed``, seen through a fixed random
    projection to ``width`` inputs; the label is the fixed linear teacher's argmax on the
    latents (learnable in a few hundred steps, unlike labels of a ``width``-wide teacher)."""
    import torch
    z = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    teacher = torch.Generator().manual_seed(12345)
    projection = torch.randn(16, width, generator=teacher) / 4
    return z @ projection, (z @ torch.randn(16, 10, generator=teacher)).argmax(1)


def _replica(rank: int, port: int, args, fragments: int, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from distqat.config import DilocoConfig, OptimConfig
    from distqat.streaming import make_diloco

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=120))
        group = dist.new_group([0, 1], timeout=timedelta(seconds=120))
        model = _model(args.width, args.depth)
        cfg = DilocoConfig(inner_steps=args.inner_steps, outer_steps=args.outer_steps,
                           fragments=fragments, overlap_steps=args.overlap,
                           merge_alpha=args.alpha)
        diloco = make_diloco(model, cfg, group, wire_format=args.wire)
        diloco.broadcast_initial()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        loss_fn = nn.CrossEntropyLoss()
        windows, step = [], 0
        for _ in range(args.outer_steps):
            w_start, outer = time.perf_counter(), 0.0
            for _ in range(args.inner_steps):
                x, y = _batch(args.width, args.batch, seed=1_000_000 * (rank + 1) + step)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                t0 = time.perf_counter()
                diloco.inner_step_done()
                outer += time.perf_counter() - t0
            t0 = time.perf_counter()
            stats = diloco.outer_step()
            outer += time.perf_counter() - t0
            windows.append({"wait": stats.wait_seconds, "outer": outer,
                            "wall": time.perf_counter() - w_start, "bytes": stats.bytes_sent,
                            "train_loss": loss.item()})
        x, y = _batch(args.width, EVAL_SAMPLES, seed=7)
        with torch.no_grad():
            local = loss_fn(model(x), y).item()
            for p, g in zip(diloco.params, diloco.global_params):
                p.copy_(g)
            global_ = loss_fn(model(x), y).item()
        buf = io.BytesIO()
        torch.save({"windows": windows, "eval_global": global_, "eval_local": local}, buf)
        queue.put((rank, "ok", buf.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        import traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_once(args, fragments: int) -> list:
    """One training run of two replicas; their results by rank."""
    import torch
    from distqat.elastic.dist import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_replica, args=(r, port, args, fragments, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=args.timeout)
            if status != "ok":
                raise RuntimeError(f"replica {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:  # ours, by PID
            if p.is_alive():
                p.kill()
                p.join(5)
    return [results[0], results[1]]


def summarize(run: list) -> dict:
    """Per-run figures, each the median over windows (the first dropped) of the two
    replicas' mean, except ``wait_min``: the replica that waited less in the window. A
    replica also waits for a slower peer to post its part (load on the shared machine
    makes one lag): that skew costs plain and streaming DiLoCo alike, and the replica
    that waited less is the one that mostly did not wait for its peer, so its wait is
    the closer to the communication alone (for streaming an upper bound of it: the
    minimum of sums, not the sum of per-fragment minima)."""
    def med(key, how=statistics.mean):
        return statistics.median(how([r["windows"][i][key] for r in run])
                                 for i in range(1, len(run[0]["windows"])))
    return {"wait": med("wait"), "wait_min": med("wait", min), "outer": med("outer"),
            "wall": med("wall"),
            "bytes": run[0]["windows"][-1]["bytes"],
            "eval_global": statistics.mean(r["eval_global"] for r in run),
            "eval_local": run[0]["eval_local"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fragments", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--outer-steps", type=int, default=10)
    ap.add_argument("--overlap", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    n_params = sum(p.numel() for p in _model(args.width, args.depth).parameters())
    print(f"MLP {args.depth}x{args.width} ({n_params / 1e6:.1f} M parameters), 2 replicas x "
          f"1 thread on gloo/loopback, batch {args.batch}, inner_steps {args.inner_steps}, "
          f"{args.outer_steps} outer steps, overlap {args.overlap}, alpha {args.alpha}, "
          f"wire {args.wire}; {args.repeats} interleaved repeats", flush=True)
    runs = {f: [] for f in args.fragments}
    for rep in range(args.repeats):
        for f in args.fragments:
            runs[f].append(summarize(run_once(args, f)))
            r = runs[f][-1]
            print(f"  repeat {rep + 1} fragments {f}: wait {r['wait'] * 1e3:.1f} ms (least "
                  f"waiting replica {r['wait_min'] * 1e3:.1f} ms), outer "
                  f"{r['outer'] * 1e3:.1f} ms, window {r['wall']:.2f} s, eval loss global "
                  f"{r['eval_global']:.4f} local {r['eval_local']:.4f}", flush=True)
    print("\nfragments | wait/window ms (mean of replicas | least waiting) | outer-step "
          "work/window ms | window s | eval loss global | eval loss replica 0 | bytes/window")
    meds = {f: {k: statistics.median(r[k] for r in runs[f]) for k in runs[f][0]}
            for f in args.fragments}
    base = meds[min(args.fragments)]  # ratios against the fewest fragments (plain: 1)
    for f in args.fragments:
        med = meds[f]
        print(f"{f:9d} | {med['wait'] * 1e3:25.1f} | {med['wait_min'] * 1e3:14.1f} | "
              f"{med['outer'] * 1e3:25.1f} | {med['wall']:8.2f} | {med['eval_global']:16.4f} | "
              f"{med['eval_local']:19.4f} | {med['bytes']}")
        if med is not base:
            def less(key):  # below 1% of plain's: say so, not a ratio of noise
                if med[key] < base[key] / 100:
                    return "> 100x less"
                return f"{base[key] / max(med[key], 1e-9):.1f}x less"
            print(f"          wait {less('wait')} (least waiting: {less('wait_min')}), "
                  f"outer-step work {less('outer')}, window {med['wall'] / base['wall']:.2f}x "
                  f"the time, eval loss {med['eval_global'] / base['eval_global']:.3f}x")


if __name__ == "__main__":
    main()
