"""Process-level plumbing: the torchrun environment, the store, the default process group,
per-stage groups and the RPC agent.

Everything here is rebuilt on every elastic round (torchrun restarts the workers), so
nothing is cached at module level. RPC gets its own port, agreed through the store,
because RPC and the process group must not share one host:port (RECIPES.md).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

log = logging.getLogger(__name__)

ENV_RANK = "RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
ENV_USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
RPC_PORT_KEY = "distqat/rpc_port"


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells a worker about itself."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart_count: int

    @classmethod
    def from_environ(cls, environ: Optional[Dict[str, str]] = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        missing = [k for k in (ENV_RANK, ENV_WORLD_SIZE, ENV_MASTER_ADDR, ENV_MASTER_PORT)
                   if k not in env]
        if missing:
            raise RuntimeError(
                f"missing environment variables {missing}: start distqat.train with torchrun "
                f"(or python -m distqat.local on one machine)")
        return cls(rank=int(env[ENV_RANK]), world_size=int(env[ENV_WORLD_SIZE]),
                   local_rank=int(env.get(ENV_LOCAL_RANK, "0")),
                   master_addr=env[ENV_MASTER_ADDR], master_port=int(env[ENV_MASTER_PORT]),
                   restart_count=int(env.get(ENV_RESTART_COUNT, "0")))


def worker_name(rank: int) -> str:
    return f"worker{rank}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (the OS picks it; another process could still
    take it before we bind, which the callers accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect_store(env: DistEnv, timeout: float) -> dist.TCPStore:
    """The round's key-value store at MASTER_ADDR:MASTER_PORT, hosted by rank 0 unless the
    agent shares its own store with the workers."""
    use_agent_store = os.environ.get(ENV_USE_AGENT_STORE, "False") == "True"
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                         is_master=(env.rank == 0 and not use_agent_store),
                         timeout=timedelta(seconds=timeout), wait_for_workers=False,
                         use_libuv=True)


def init_default_group(env: DistEnv, store: dist.Store, backend: str, timeout: float) -> None:
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout))


def new_stage_groups(stage_ranks: Sequence[Sequence[int]], backend: str,
                     timeout: float) -> List[Optional[dist.ProcessGroup]]:
    """One group per stage, made in stage order on every rank (new_group is collective
    over the whole world, so every rank must make every group in the same order).
    Returns the group objects; entries are None on ranks outside that group."""
    groups = []
    for ranks in stage_ranks:
        group = dist.new_group(ranks=list(ranks), backend=backend,
                               timeout=timedelta(seconds=timeout))
        groups.append(group if dist.get_rank() in ranks else None)
    return groups


def init_rpc(env: DistEnv, store: dist.Store, *, num_threads: int, rpc_timeout: float,
             init_timeout: float, transport: str = "uv") -> None:
    """Start the TensorPipe agent on a port of its own, chosen by rank 0 and shared
    through the store. ``transport``: ``comm.rpc_transport`` (``uv``: TCP only, no
    busy-polling shared-memory reactor; ``auto``: TensorPipe's own choice)."""
    if env.rank == 0:
        store.set(RPC_PORT_KEY, str(free_port(_bind_host(env.master_addr))))
    store.wait([RPC_PORT_KEY], timedelta(seconds=init_timeout))
    port = int(store.get(RPC_PORT_KEY))
    transports = {"_transports": [transport]} if transport != "auto" else {}
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=num_threads, rpc_timeout=rpc_timeout,
        init_method=f"tcp://{env.master_addr}:{port}", **transports)
    rpc.init_rpc(worker_name(env.rank), rank=env.rank, world_size=env.world_size,
                 rpc_backend_options=options)


def _bind_host(addr: str) -> str:
    try:
        return socket.gethostbyname(addr)
    except OSError:
        return "127.0.0.1"


def shutdown_rpc(graceful: bool, timeout: float) -> None:
    """Graceful shutdown waits for every peer (bounded by ``timeout``); a dead peer makes
    it fail, and then the local agent is stopped without waiting (RECIPES.md)."""
    if graceful:
        try:
            rpc.shutdown(graceful=True, timeout=timeout)
            return
        except Exception as e:  # a peer is gone or late: stop locally
            log.warning("graceful RPC shutdown failed (%s); shutting down locally", e)
    try:
        rpc.shutdown(graceful=False)
    except Exception as e:
        log.debug("local RPC shutdown: %s", e)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
