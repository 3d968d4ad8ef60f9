"""Run a function on N real processes joined by a real gloo process group (loopback; the
parent holds the store, so no rank connects to a port that is not bound yet), each bounded
by a timeout and killed by PID if it overruns.

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

from distqat.elastic.interface import serve_store

_store = None  # in a rank: the parent's store, for a test that needs one (rank_store)


def rank_store(prefix: str):
    """In a rank: the parent's store, under keys of its own (e.g. for RPC's rendezvous)."""
    import torch.distributed as dist
    return dist.PrefixStore(prefix, _store)


def _entry(fn, rank, world_size, port, queue, args):
    import torch.distributed as dist
    global _store
    try:
        torch_threads = int(os.environ.get("DISTQAT_TEST_THREADS", "1"))
        import torch
        torch.set_num_threads(torch_threads)
        _store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                               timeout=timedelta(seconds=60), use_libuv=True)
        dist.init_process_group("gloo", store=_store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
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
    store = serve_store("127.0.0.1", 0, timeout=timeout)
    port = store.port
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
