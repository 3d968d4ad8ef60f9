"""Run a function on N real processes joined by a real gloo process group (loopback,
free port), each bounded by a timeout and killed by PID if it overruns.

Results travel as ``torch.save`` bytes, not as tensors: torch registers its own queue
pickler that hands tensors over as shared-memory file descriptors, and those can only be
fetched while the sending process is alive. A rank that finished and exited before the
parent read its result made the parent fail with FileNotFoundError."""

from __future__ import annotations

import multiprocessing as mp
import os
import io
import traceback
from datetime import timedelta
from typing import Any, Callable, List

from distqat.elastic.dist import free_port


def _entry(fn, rank, world_size, port, queue, args):
    import torch.distributed as dist
    try:
        torch_threads = int(os.environ.get("DISTQAT_TEST_THREADS", "1"))
        import torch
        torch.set_num_threads(torch_threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        result = io.BytesIO()
        torch.save(fn(rank, world_size, *args), result)
        queue.put((rank, "ok", result.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120) -> List[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns the results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            import torch
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [results[r] for r in range(world_size)]
